"""`make run` as a user runs it: the whole stack, a subscriber crash, Ctrl-C during traffic.

Ctrl-C must lose nothing: the stack stops in data-flow order (traffic, publisher flush,
subscribers once drained, exporter, emulator, store), so every published event has a receipt
on the healthy subscription and, on the lossy one, exactly the events its fault knob drops
are missing. A subscriber killed mid-run is restarted and records again, and `make stop`
from another terminal leaves nothing running. (What the killed subscriber held is not checked
here: the emulator 0.8.20 never closes a stream whose client died, NoSuchMethodError in its
log, and keeps handing it messages, so they reach the new process after several lease
periods; real Pub/Sub closes the stream.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from eventaudit.exporter.buckets import floor_to_bucket
from eventaudit.store import MongoStore
from eventaudit.subscriber.audited import Faults
from tests.conftest import wait_for
from tools import run, stack


def _free_offset() -> int:
    for _ in range(50):
        offset = int.from_bytes(os.urandom(2), "big") % 20000 + 1000
        if all(
            port + offset < 32768 and not stack.port_open(port + offset)
            for port in run.PORTS.values()
        ):
            return offset
    pytest.fail("no free port offset for the make run stack")


def _pid_listening(port: int) -> int:
    """The pid of the process whose cmdline names the subscriber's listen address."""
    needle = f"127.0.0.1:{port}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"eventaudit.subscriber" in cmdline and needle in cmdline:
                return int(entry.name)
    pytest.fail(f"no subscriber process listening on {port}")


def _published_count(url: str) -> float:
    samples = run.scrape(f"{url}/metrics")
    return run.sample_sum(samples, "eventaudit_publisher_events_total", outcome="published")


def _start_run(tmp_path: Path, rate: int) -> tuple[subprocess.Popen[bytes], dict[str, int], Path]:
    """`make run` (tools.run) on shifted ports with its data under tmp_path/run."""
    offset = _free_offset()
    ports = {name: port + offset for name, port in run.PORTS.items()}
    data = tmp_path / "run"
    with (tmp_path / "run.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "tools.run", "--rate", str(rate)),
                *("--port-offset", str(offset), "--data-dir", str(data)),
            ],
            cwd=stack.ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={
                **{k: v for k, v in os.environ.items() if k != "PUBSUB_EMULATOR_HOST"},
                "PYTHONUNBUFFERED": "1",
            },
        )
    return proc, ports, data


def _leave_nothing_running(proc: subprocess.Popen[bytes], data: Path) -> None:
    """Whatever happened in the test, stop the stack and every child it started."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    run.stop_running(data, timeout=30)  # children a killed make run left behind


def test_ctrl_c_during_traffic_loses_nothing(tmp_path: Path) -> None:
    proc, ports, data = _start_run(tmp_path, rate=40)
    publisher = f"http://127.0.0.1:{ports['publisher']}"
    try:
        wait_for(lambda: _published_count(publisher) >= 150, 120, "150 events through make run")
        proc.send_signal(signal.SIGINT)  # Ctrl-C, during traffic
        assert proc.wait(timeout=180) == 0
    finally:
        _leave_nothing_running(proc, data)
    output = (tmp_path / "run.log").read_text()
    assert "every subscription drained" in output, output[-3000:]
    assert "[run] stopped; nothing left running" in output
    assert not any(stack.port_open(port) for port in ports.values()), "a service outlived make run"

    port = stack.free_port()
    ferret = stack.ferretdb(port, data / "ferretdb", tmp_path / "logs").start()
    try:
        store = MongoStore(f"mongodb://127.0.0.1:{port}/", "eventaudit")
        published = {d["eventID"] for d in store.published.find({"topic": run.TOPIC})}
        healthy = {
            d["eventID"] for d in store.received.find({"subscription": run.SUBSCRIPTIONS[0]})
        }
        lossy = {d["eventID"] for d in store.received.find({"subscription": run.SUBSCRIPTIONS[1]})}
        pushed = {
            d["eventID"] for d in store.received.find({"subscription": run.PUSH_SUBSCRIPTION})
        }
        store.close()
    finally:
        ferret.stop()
    lose = Faults.lose_fraction(run.LOSE_FRACTION).lose
    assert len(published) >= 150
    assert published - healthy == set()
    assert published - lossy == {e for e in published if lose(e)}
    assert healthy - published == set() and lossy - published == set()
    assert pushed == published  # the push subscription, drained before the emulator stopped


def test_a_restart_of_every_process_counts_nothing_twice(tmp_path: Path) -> None:
    """Stop the whole stack during traffic, start it again on the same data: the buckets of the
    first run are counted exactly once (the journal the first exporter left is folded by the
    second, and what the first had folded is not folded again)."""
    proc, ports, data = _start_run(tmp_path, rate=40)
    publisher = f"http://127.0.0.1:{ports['publisher']}"
    try:
        wait_for(lambda: _published_count(publisher) >= 150, 120, "150 events through make run")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=180) == 0
    finally:
        _leave_nothing_running(proc, data)
    proc, ports, data = _start_run(tmp_path, rate=1)
    store = MongoStore(f"mongodb://127.0.0.1:{ports['ferretdb']}/", "eventaudit")
    try:
        first = {d["eventID"]: d["publishTime"] for d in store.published.find({"topic": run.TOPIC})}
        buckets = {floor_to_bucket(t, timedelta(seconds=10)) for t in first.values()}
        receipts = {
            sub: {d["eventID"] for d in store.received.find({"subscription": sub})} & set(first)
            for sub in run.SUBSCRIPTIONS
        }

        def only_first() -> set[datetime]:
            """The first run's buckets the second run published nothing in (its first events
            may share the last one)."""
            second = {
                floor_to_bucket(d["publishTime"], timedelta(seconds=10))
                for d in store.published.find({"topic": run.TOPIC})
                if d["eventID"] not in first
            }
            return buckets - second

        def counted(kept: set[datetime]) -> tuple[int, dict[str, int]]:
            results = [
                r
                for r in store.load_bucket_results(min(buckets))
                if r.topic == run.TOPIC and r.start in kept
            ]
            return sum(r.published for r in results), {
                sub: sum(r.subscriptions[sub].received for r in results if sub in r.subscriptions)
                for sub in run.SUBSCRIPTIONS
            }

        def expected(kept: set[datetime]) -> tuple[int, dict[str, int]]:
            events = {
                e for e, t in first.items() if floor_to_bucket(t, timedelta(seconds=10)) in kept
            }
            return len(events), {sub: len(got & events) for sub, got in receipts.items()}

        wait_for(
            lambda: counted(only_first()) == expected(only_first()),
            120,
            "the first run's buckets counted once",
        )
        assert len(first) >= 150 and receipts[run.SUBSCRIPTIONS[0]] == set(first)
        time.sleep(12)  # another evaluation or more: still once
        kept = only_first()
        assert len(kept) >= len(buckets) - 1
        assert counted(kept) == expected(kept)
    finally:
        store.close()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=180)
        finally:
            _leave_nothing_running(proc, data)


def _recorded(url: str) -> float:
    samples = run.scrape(f"{url}/metrics")
    return run.sample_sum(samples, "eventaudit_subscriber_messages_total", outcome="recorded")


def test_a_dead_subscriber_is_restarted_and_make_stop_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    proc, ports, data = _start_run(tmp_path, rate=20)
    subscriber = f"http://127.0.0.1:{ports['subscriber-1']}"
    try:
        wait_for(
            lambda: (
                "eventaudit is running" in (tmp_path / "run.log").read_text()  # all started
                or proc.poll() is not None
            ),
            120,
            "the make run stack up",
        )
        wait_for(lambda: _recorded(subscriber) >= 20, 60, "subscriber-1 recording")
        victim = _pid_listening(ports["subscriber-1"])
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: (
                stack.http_ok(f"{subscriber}/metrics")
                and _pid_listening(ports["subscriber-1"]) != victim
            ),
            60,
            "subscriber-1 restarted",
        )
        # The new process records new traffic.
        wait_for(lambda: _recorded(subscriber) >= 20, 60, "the restarted subscriber recording")
        state = json.loads(run.state_path(data).read_text())
        assert run.alive(state["children"]["subscriber-1"])  # the state names the new process
        stop = subprocess.run(
            [sys.executable, "-m", "tools.run", "--stop", "--data-dir", str(data)],
            cwd=stack.ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert "nothing left running" in stop.stdout
        assert proc.wait(timeout=10) == 0
    finally:
        _leave_nothing_running(proc, data)
    output = (tmp_path / "run.log").read_text()
    assert "subscriber-1 exited with -9" in output, output[-3000:]
    assert "restarting subscriber-1" in output
    assert set(state["children"]) == set(run.PORTS)
    assert not any(run.alive(identity) for identity in state["children"].values())
    assert run.process_start(victim) is None  # the killed process was reaped
    assert not any(stack.port_open(port) for port in ports.values())
    assert not run.state_path(data).exists()
    again = subprocess.run(
        [sys.executable, "-m", "tools.run", "--stop", "--data-dir", str(data)],
        cwd=stack.ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (again.returncode, "nothing runs" in again.stdout) == (0, True)
