"""`make run`'s pure decisions: when a subscriber has drained, when a dead child is restarted."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.run import PORTS, RestartPolicy, drained, handled, offset_prometheus_config


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
