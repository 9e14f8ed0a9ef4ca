"""The background evaluation loop and periodic retention."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from eventaudit.exporter.collector import EvaluationState
from eventaudit.exporter.evaluator import Evaluator, log_snapshot
from eventaudit.store import ExporterStore, StoreError

log = logging.getLogger(__name__)


class EvaluationLoop:
    """Evaluates once per bucket; failures are logged with their traceback and remembered."""

    def __init__(
        self,
        evaluator: Evaluator,
        state: EvaluationState,
        store: ExporterStore,
        interval: timedelta,
        retention: timedelta,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._evaluator = evaluator
        self._state = state
        self._store = store
        self._interval = interval.total_seconds()
        self._retention = retention
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="evaluation-loop", daemon=True)
        self._last_retention = float("-inf")  # run retention with the first evaluation

    def run_once(self) -> bool:
        """One evaluation (and retention when due); True on success."""
        started = time.perf_counter()
        try:
            snapshot = self._evaluator.evaluate(self._clock())
        except StoreError as exc:
            self._state.failed(str(exc), time.perf_counter() - started)
            log.error("evaluation failed: %s", exc)
            return False
        except Exception as exc:
            self._state.failed(repr(exc), time.perf_counter() - started)
            log.exception("evaluation failed")
            return False
        self._state.succeeded(snapshot, time.perf_counter() - started)
        log_snapshot(snapshot)
        if time.monotonic() - self._last_retention > 3600:
            self._apply_retention()
        return True

    def _apply_retention(self) -> None:
        cutoff = self._clock() - self._retention
        try:
            deleted = self._store.delete_older_than(cutoff)
        except StoreError as exc:
            log.warning("retention delete failed, will retry: %s", exc)
            return
        self._last_retention = time.monotonic()
        log.info("retention: deleted records older than %s: %s", cutoff.isoformat(), deleted)

    def start(self) -> None:
        """Run in a daemon thread until stop()."""
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current evaluation."""
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.run_once()
            # Wake just after the next bucket boundary settles, not on a drifting timer.
            now = time.time()
            self._stop.wait(self._interval - (now % self._interval) + 0.05)
