"""`make run` as a user runs it: the whole stack, a subscriber crash, Ctrl-C during traffic.

Ctrl-C must lose nothing: the stack stops in data-flow order (traffic, publisher flush,
subscribers once drained, exporter, emulator, store), so every published event has a receipt
on the healthy subscription and, on the lossy one, exactly the events its fault knob drops
are missing. A subscriber killed mid-run is restarted and redelivery fills its gap.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
    samples = run.scrape(f"{url}/metrics") or {}
    return sum(
        v
        for labels, v in samples.get("eventaudit_publisher_events_total", [])
        if labels.get("outcome") == "published"
    )


def test_ctrl_c_during_traffic_loses_nothing_and_a_dead_subscriber_is_restarted(
    tmp_path: Path,
) -> None:
    offset = _free_offset()
    ports = {name: port + offset for name, port in run.PORTS.items()}
    data = tmp_path / "run"
    log = (tmp_path / "run.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tools.run",
            "--rate",
            "40",
            "--port-offset",
            str(offset),
            "--data-dir",
            str(data),
        ],
        cwd=stack.ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if k != "PUBSUB_EMULATOR_HOST"},
    )
    publisher = f"http://127.0.0.1:{ports['publisher']}"
    try:
        wait_for(lambda: _published_count(publisher) >= 100, 120, "100 events through make run")
        victim = _pid_listening(ports["subscriber-1"])
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: (
                stack.http_ok(f"http://127.0.0.1:{ports['subscriber-1']}/metrics")
                and _pid_listening(ports["subscriber-1"]) != victim
            ),
            60,
            "subscriber-1 restarted",
        )
        time.sleep(3)  # traffic keeps flowing through the restarted subscriber
        proc.send_signal(signal.SIGINT)  # Ctrl-C, during traffic
        assert proc.wait(timeout=180) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    output = (tmp_path / "run.log").read_text()
    assert "subscriber-1 exited with -9" in output, output[-3000:]
    assert "restarting subscriber-1" in output
    assert "every subscription drained" in output, output[-3000:]
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
        store.close()
    finally:
        ferret.stop()
    lose = Faults.lose_fraction(0.02).lose
    assert len(published) >= 150
    assert published - healthy == set()
    assert published - lossy == {e for e in published if lose(e)}
    assert healthy - published == set() and lossy - published == set()
