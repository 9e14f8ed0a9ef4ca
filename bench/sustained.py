"""Sustained load on `make run`'s stack, on top of stored history.

    python -m bench.sustained --rate 350 --minutes 10 --stored 100000

1. Seeds `--stored` events of history (a publish record and a receipt on each of make run's two
   subscriptions, spread over the three hours before now) into a fresh data directory, through
   the writers (so the journal is written), and folds them once.
2. Starts `make run` (tools.run) on that directory and posts `--rate` requests/s to its
   publisher API from a pool of threads for `--minutes`, watching every 2 s: `eventaudit_up`,
   the evaluation duration, the journal backlog, the subscribers' pending receipts and the
   size of FerretDB's SQLite write-ahead log.
3. Stops it with Ctrl-C (make run drains the subscribers) and checks that every published event
   has a receipt on the healthy subscription and the push one, and on the lossy one all but
   those its fault knob drops.
4. Starts it again on the same data and measures how long `eventaudit_up` stays 0.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

from eventaudit.contract import utc_now_ms
from eventaudit.exporter.buckets import Window
from eventaudit.exporter.evaluator import Evaluator
from eventaudit.exporter.subscriptions import ExpectedSubscriptions
from eventaudit.records import PublishRecord, Receipt
from eventaudit.store import MongoStore
from eventaudit.subscriber.audited import Faults
from tools import run, stack

BATCH = 5000


def _ms(moment: datetime) -> datetime:
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def _seed(data: Path, stored: int) -> None:
    port = stack.free_port()
    ferret = stack.ferretdb(port, data / "ferretdb", data / "seed-logs").start()
    store = MongoStore(f"mongodb://127.0.0.1:{port}/", "eventaudit", timeout_seconds=60)
    try:
        store.ping()
        now = datetime.now(UTC)
        for start in range(0, stored, BATCH):
            ids = range(start, min(stored, start + BATCH))
            when = [
                _ms(now - timedelta(minutes=2) - timedelta(hours=3) * (1 - i / stored)) for i in ids
            ]
            store.insert_publish_records(
                [
                    PublishRecord(f"seed-{i}", "t" * 32, run.TOPIC, "{}", str(i), w)
                    for i, w in zip(ids, when, strict=True)
                ],
                utc_now_ms(),
            )
            for sub in run.SUBSCRIBED.values():
                store.record_receipts(
                    [
                        Receipt(sub, f"seed-{i}", run.TOPIC, None, str(i), w, w, w)
                        for i, w in zip(ids, when, strict=True)
                    ],
                    utc_now_ms(),
                )
        expected = ExpectedSubscriptions({run.TOPIC: set(run.SUBSCRIBED.values())}, set(), None)
        windows = [Window.parse(w, timedelta(seconds=10)) for w in ("1m", "5m", "1h")]
        evaluator = Evaluator(
            store,
            expected,
            windows,
            timedelta(seconds=10),
            timedelta(seconds=30),
            budget=timedelta(hours=1),
        )
        started = time.perf_counter()
        evaluator.evaluate(datetime.now(UTC))
        print(
            f"[sustained] seeded {stored} events, folded in {time.perf_counter() - started:.1f} s"
        )
    finally:
        store.close()
        ferret.stop()


def _start(data: Path, offset: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                *(sys.executable, "-m", "tools.run", "--rate", "1"),
                *("--port-offset", str(offset), "--data-dir", str(data)),
            ],
            cwd=stack.ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if k != "PUBSUB_EMULATOR_HOST"},
        )


def _metric(url: str, name: str, **labels: str) -> float | None:
    samples = run.scrape(f"{url}/metrics")
    if samples is None or name not in samples:
        return None
    return run.sample_sum(samples, name, **labels)


def _wal_bytes(data: Path) -> int:
    return sum(p.stat().st_size for p in (data / "ferretdb").rglob("*-wal"))


def _load(url: str, rate: float, stop: threading.Event, counts: dict[str, int]) -> None:
    """`rate` POSTs a second in total from 16 threads, each on its own schedule."""
    threads = 16
    lock = threading.Lock()

    def worker(k: int) -> None:
        start = time.monotonic() + k / rate
        n = 0
        while not stop.is_set():
            due = start + n * threads / rate
            n += 1
            delay = due - time.monotonic()
            if delay > 0 and stop.wait(delay):
                return
            req = urllib.request.Request(url, data=b"", method="POST")
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    resp.read()
                ok = "ok"
            except Exception:
                ok = "failed"
            with lock:
                counts[ok] += 1

    pool = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def _wait_up(exporter: str, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if _metric(exporter, "eventaudit_up") == 1:
            return time.monotonic() - started
        time.sleep(0.5)
    raise SystemExit(f"exporter not up after {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=350.0)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--stored", type=int, default=100_000)
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="eventaudit-sustained-"))
    log = data / "run.log"
    _seed(data, args.stored)
    offset = 20000
    ports = {name: port + offset for name, port in run.PORTS.items()}
    exporter = f"http://127.0.0.1:{ports['exporter']}"
    subscribers = [f"http://127.0.0.1:{ports[f'subscriber-{i}']}" for i in (1, 2)]
    proc = _start(data, offset, log)
    try:
        first_up = _wait_up(exporter, 180)
        print(f"[sustained] stack up; exporter up {first_up:.1f} s after its start was asked")
        stop = threading.Event()
        counts = {"ok": 0, "failed": 0}
        loader = threading.Thread(
            target=_load,
            args=(f"http://127.0.0.1:{ports['publisher']}/api/v1/users", args.rate, stop, counts),
        )
        loader.start()
        started = time.monotonic()
        worst = {"down_samples": 0, "eval_s": 0.0, "backlog": 0.0, "pending": 0.0, "wal": 0}
        samples = 0
        while time.monotonic() - started < args.minutes * 60:
            time.sleep(2)
            samples += 1
            worst["down_samples"] += _metric(exporter, "eventaudit_up") != 1
            worst["eval_s"] = max(
                worst["eval_s"], _metric(exporter, "eventaudit_evaluation_duration_seconds") or 0
            )
            worst["backlog"] = max(
                worst["backlog"], _metric(exporter, "eventaudit_journal_backlog") or 0
            )
            for sub in subscribers:
                worst["pending"] = max(
                    worst["pending"], _metric(sub, "eventaudit_subscriber_pending_receipts") or 0
                )
            worst["wal"] = max(worst["wal"], _wal_bytes(data))
        stop.set()
        loader.join()
        elapsed = time.monotonic() - started
        print(
            f"[sustained] {counts['ok']} requests in {elapsed:.0f} s "
            f"({counts['ok'] / elapsed:.0f}/s, {counts['failed']} failed); over {samples} samples: "
            f"eventaudit_up 0 in {worst['down_samples']}, longest evaluation "
            f"{worst['eval_s']:.2f} s, journal backlog max {worst['backlog']:.0f}, pending "
            f"receipts max {worst['pending']:.0f}, WAL max {worst['wal'] / 2**20:.0f} MiB"
        )
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        run.stop_running(data, timeout=30)
    port = stack.free_port()
    ferret = stack.ferretdb(port, data / "ferretdb", data / "check-logs").start()
    try:
        store = MongoStore(f"mongodb://127.0.0.1:{port}/", "eventaudit", timeout_seconds=120)
        published = {
            d["eventID"]
            for d in store.published.find({"topic": run.TOPIC}, {"eventID": 1})
            if not d["eventID"].startswith("seed-")
        }
        got = [
            {d["eventID"] for d in store.received.find({"subscription": s}, {"eventID": 1})}
            for s in (*run.SUBSCRIPTIONS, run.PUSH_SUBSCRIPTION)
        ]
        journal = store.journal_size()
        store.close()
    finally:
        ferret.stop()
    lose = Faults.lose_fraction(run.LOSE_FRACTION).lose
    print(
        f"[sustained] after Ctrl-C: {len(published)} events published; healthy subscription "
        f"missing {len(published - got[0])}; lossy missing {len(published - got[1])} "
        f"(its fault knob drops {sum(1 for e in published if lose(e))}, other losses "
        f"{len((published - got[1]) - {e for e in published if lose(e)})}); push subscription "
        f"missing {len(published - got[2])}; journal left "
        f"{journal} documents; WAL now {_wal_bytes(data) / 2**20:.0f} MiB"
    )
    proc = _start(data, offset, log)
    try:
        up = _wait_up(exporter, 180)
        first = _metric(exporter, "eventaudit_evaluation_duration_seconds") or 0.0
        print(
            f"[sustained] restarted: eventaudit_up 1 {up:.1f} s after make run started (the "
            f"stack's start-up included); the exporter's first evaluation took {first:.2f} s"
        )
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        run.stop_running(data, timeout=30)
    shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
