"""The background evaluation loop and periodic retention."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from eventaudit.exporter.collector import EvaluationState
from eventaudit.exporter.evaluator import Evaluator
from eventaudit.exporter.snapshot import log_snapshot
from eventaudit.store import ExporterStore, StoreError

log = logging.getLogger(__name__)

RETENTION_EVERY_SECONDS = 3600.0
# A failed retention delete is retried after twice the evaluation interval, doubling with each
# further failure up to RETENTION_EVERY_SECONDS: a delete that keeps timing out is not re-run
# (holding the evaluation thread) on every pass.
_MAX_DOUBLINGS = 32


def served_reason(exc: BaseException) -> str:
    """The short cause served over HTTP; the exception itself (hosts, topology) is only logged."""
    return "audit store unavailable" if isinstance(exc, StoreError) else "internal error"


class EvaluationLoop:
    """Evaluates once per bucket and applies retention hourly, on a thread of its own.

    Nothing raised in a pass stops the loop: a failed evaluation is counted
    (`eventaudit_evaluations_total{outcome="error"}`), logged, and served as `eventaudit_up 0`
    until a later pass succeeds. Retention is apart from that: a failed delete is counted
    (`eventaudit_retention_runs_total{outcome="error"}`), logged and retried with backoff, and
    never takes the numbers down.
    """

    def __init__(
        self,
        evaluator: Evaluator,
        state: EvaluationState,
        store: ExporterStore,
        interval: timedelta,
        retention: timedelta,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._evaluator = evaluator
        self._state = state
        self._store = store
        self._interval = interval.total_seconds()
        self._retention = retention
        self._clock = clock
        self._monotonic = monotonic
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, name="evaluation-loop", daemon=True)
        self._retention_due = float("-inf")  # run retention with the first evaluation
        self._retention_failures = 0  # in a row
        self._retainer: threading.Thread | None = None
        state.expect_every(self._interval)

    def run_once(self) -> bool:
        """One evaluation, then retention when due; True when the evaluation succeeded.

        Never raises Exception.
        """
        ok = self._evaluate()
        self._retain_if_due()
        return ok

    def _evaluate(self) -> bool:
        started = time.perf_counter()
        phase = "evaluation"
        try:
            snapshot = self._evaluator.evaluate(self._clock())
            phase = "logging"
            log_snapshot(snapshot)
        except Exception as exc:
            reason = f"{phase} failed: {served_reason(exc)}"
            self._state.failed(reason, time.perf_counter() - started)
            if isinstance(exc, StoreError):
                log.error("%s: %s", reason, exc)
            else:
                log.exception(reason)
            return False
        self._state.succeeded(snapshot, time.perf_counter() - started)
        return True

    def _retain_if_due(self) -> None:
        """Start retention on its own thread, hourly (after a failure, with backoff), unless one
        still runs: on FerretDB its deletes read whole collections, and must not hold the
        evaluations (and eventaudit_up) back."""
        if self._monotonic() < self._retention_due or (
            self._retainer is not None and self._retainer.is_alive()
        ):
            return
        self._retainer = threading.Thread(target=self._retain, name="retention", daemon=True)
        self._retainer.start()

    def join_retention(self, timeout: float = 30.0) -> None:
        """Wait for a retention in progress (tests, and a clean stop)."""
        if self._retainer is not None:
            self._retainer.join(timeout)

    def _retain(self) -> None:
        """Delete what is older than the retention (records, and the digests and results of
        their buckets), by the earliest the clock could mean (a clock stepped forward deletes
        nothing early); never raises."""
        try:
            cutoff = self._evaluator.trusted_now(self._clock()) - self._retention
            deleted = self._store.delete_older_than(cutoff)
            finished = self._clock().timestamp()
        except Exception as exc:
            self._retention_failures += 1
            doublings = min(self._retention_failures, _MAX_DOUBLINGS)
            delay = min(self._interval * 2**doublings, RETENTION_EVERY_SECONDS)
            self._retention_due = self._monotonic() + delay
            self._state.retention_failed()
            args = (self._retention_failures, delay)
            if isinstance(exc, StoreError):
                log.error("retention failed (%d in a row), retrying in %.0fs: %s", *args, exc)
            else:
                log.exception("retention failed (%d in a row), retrying in %.0fs", *args)
            return
        self._retention_failures = 0
        self._retention_due = self._monotonic() + RETENTION_EVERY_SECONDS
        self._state.retention_succeeded(finished)
        log.info("retention: deleted records older than %s: %s", cutoff.isoformat(), deleted)

    def start(self) -> None:
        """Run in a daemon thread until stop()."""
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current evaluation."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    @property
    def running(self) -> bool:
        """Whether the evaluation thread still runs (an evaluation may be in progress)."""
        return self._thread.is_alive()

    def run(self) -> None:
        """Evaluate until stop(); the state says when this has ended, whatever ended it."""
        try:
            while not self._stop.is_set():
                try:
                    self.run_once()
                except Exception:  # run_once catches everything; this is the last resort
                    self._state.failed("evaluation failed: internal error", 0.0)
                    log.exception("evaluation pass failed")
                # Wake just after the next bucket boundary settles, not on a drifting timer.
                now = time.time()
                self._stop.wait(self._interval - (now % self._interval) + 0.05)
        finally:
            self._state.loop_stopped()
            if not self._stop.is_set():
                log.critical("evaluation loop ended unexpectedly; eventaudit_up stays 0")
