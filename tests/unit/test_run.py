"""`make run`'s pure decisions: when a subscriber has drained, when a dead child is restarted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.run import (
    PORTS,
    STOP_ORDER,
    RestartPolicy,
    alive,
    drained,
    handled,
    offset_prometheus_config,
    process_start,
    sample_sum,
    state_path,
    stop_running,
    write_state,
)
from tools.run import main as run_main


@pytest.mark.parametrize(
    ("published", "acked", "pending", "expected"),
    [
        (0, 0, 0, True),
        (100, 100, 0, True),
        (100, 103, 0, True),  # redeliveries counted twice
        (100, 99, 0, False),
        (100, 100, 1, False),
        (100, 0, float("inf"), False),  # subscriber unreachable
    ],
)
def test_drained(published: float, acked: float, pending: float, expected: bool) -> None:
    assert drained(published, acked, pending) is expected


def test_handled_counts_only_acked_outcomes() -> None:
    samples = {
        "eventaudit_subscriber_messages_total": [
            ({"subscription": "s", "outcome": "recorded"}, 90.0),
            ({"subscription": "s", "outcome": "fault_lost"}, 2.0),
            ({"subscription": "s", "outcome": "invalid"}, 1.0),
            ({"subscription": "s", "outcome": "store_error"}, 50.0),  # nacked: redelivered later
        ],
        "eventaudit_subscriber_pending_receipts": [({"subscription": "s"}, 4.0)],
    }
    assert handled(samples) == (93.0, 4.0)
    assert handled(None) == (0.0, float("inf"))


def test_restart_policy_allows_five_restarts_per_five_minutes() -> None:
    policy = RestartPolicy()
    assert [policy.allow(t) for t in (0, 1, 2, 3, 4, 5)] == [True] * 5 + [False]
    assert policy.allow(299) is False
    assert policy.allow(300.5) is True  # the restart at t=0 has aged out


def test_prometheus_config_follows_the_port_offset(tmp_path: Path) -> None:
    source = Path(__file__).resolve().parents[2] / "prometheus" / "prometheus.yml"
    ports = {name: port + 1000 for name, port in PORTS.items()}
    text = offset_prometheus_config(source, tmp_path / "p.yml", ports).read_text()
    for name in ("exporter", "publisher", "subscriber-1", "subscriber-2", "alertmanager"):
        assert f'127.0.0.1:{ports[name]}"' in text
        assert f'127.0.0.1:{PORTS[name]}"' not in text
    assert f"- {source.parent / 'alerts.yml'}" in text


def test_stop_with_no_state_says_nothing_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert stop_running(tmp_path) == 0
    assert "nothing runs" in capsys.readouterr().out


def test_stop_never_signals_a_process_that_reused_a_pid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # This very process, but with another start time: a pid reused since the file was written.
    me = [os.getpid(), (process_start(os.getpid()) or 0) + 1]
    write_state(tmp_path, {"run": me, "children": {"publisher": me}})
    assert stop_running(tmp_path) == 0  # and we are still alive to assert it
    assert "stale state removed" in capsys.readouterr().out
    assert not state_path(tmp_path).exists()


def test_unreadable_state_is_an_error(tmp_path: Path) -> None:
    state_path(tmp_path).write_text("{not json")
    assert stop_running(tmp_path) == 1


def test_process_identity() -> None:
    me = [os.getpid(), process_start(os.getpid()) or 0]
    assert alive(me)
    assert not alive([me[0], me[1] + 1])
    assert not alive([2**22 + 12345, 1])  # beyond pid_max: no such process


@pytest.mark.parametrize(
    "argv",
    [
        ["--port-offset", "70000"],
        ["--port-offset", "-27000"],
        ["--rate", "0"],
        ["--rate", "-1"],
        ["--rate", "nan"],
        ["--rate", "1e9"],
        ["--port-offset", "\u0661"],
        ["--rate", "\u0661"],
        ["--rate", "inf"],
        ["--rate", "1e3"],
        ["--duration", "-5"],
        ["--drain-seconds", "10\n"],
    ],
)
def test_bad_run_arguments_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        run_main(argv)
    assert exc.value.code == 2


def test_a_message_given_up_after_internal_errors_counts_as_handled() -> None:
    samples = {
        "eventaudit_subscriber_messages_total": [
            ({"subscription": "s", "outcome": "recorded"}, 9.0),
            ({"subscription": "s", "outcome": "internal_error_dropped"}, 1.0),
        ],
    }
    assert handled(samples) == (10.0, 0.0)


def test_sample_sum_matches_labels_and_any_of_a_tuple() -> None:
    samples = {
        "m": [({"outcome": "a", "s": "x"}, 1.0), ({"outcome": "b", "s": "x"}, 2.0), ({}, 4.0)]
    }
    assert sample_sum(samples, "m") == 7.0
    assert sample_sum(samples, "m", outcome="a") == 1.0
    assert sample_sum(samples, "m", outcome=("a", "b"), s="x") == 3.0
    assert sample_sum(samples, "other") == 0.0
    assert sample_sum(None, "m") == 0.0


def test_make_stop_after_make_run_was_killed_stops_its_children_in_data_flow_order(
    tmp_path: Path,
) -> None:
    # Issue 17, case 13: in start order the store stopped first, and events the publisher
    # had answered were lost with it.
    log = tmp_path / "stopped"
    started = ["ferretdb", "pubsub-emulator", "prometheus", "alertmanager", "publisher"]
    started += ["subscriber-1", "subscriber-2", "push", "exporter"]
    code = (
        "import signal, sys, time\n"
        "def stop(*_):\n"
        f"    open({str(log)!r}, 'a').write(sys.argv[1] + '\\n'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", code, name], start_new_session=True, stdout=subprocess.PIPE
        )
        for name in started
    }
    try:
        for proc in procs.values():
            assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        children = {n: [p.pid, process_start(p.pid) or 0] for n, p in procs.items()}
        dead = [os.getpid(), (process_start(os.getpid()) or 0) + 1]  # the killed make run
        write_state(tmp_path, {"run": dead, "children": children})
        assert stop_running(tmp_path, drain_seconds=0) == 0
        assert log.read_text().split() == list(STOP_ORDER)
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
