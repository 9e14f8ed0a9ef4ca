"""Expected subscriptions: configured, listed, seen, minus exclusions."""

from __future__ import annotations

from eventaudit.exporter.subscriptions import ExpectedSubscriptions
from eventaudit.subscriber.audited import Faults


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_union_minus_exclusions() -> None:
    expected = ExpectedSubscriptions(
        {"t": {"configured"}}, {("t", "excluded")}, lambda topic: ["listed", "excluded"]
    )
    assert expected.for_topic("t", {"seen"}) == {"configured", "listed", "seen"}
    assert expected.for_topic("other", set()) == {"listed", "excluded"}


def test_listing_error_keeps_last_good_listing() -> None:
    clock = Clock()
    answers: list[object] = [["a", "b"], RuntimeError("503"), ["a"]]

    def lister(topic: str) -> list[str]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, list)
        return answer

    expected = ExpectedSubscriptions({}, set(), lister, refresh_seconds=60, clock=clock)
    assert expected.for_topic("t", set()) == {"a", "b"}
    clock.now = 30
    assert expected.for_topic("t", set()) == {"a", "b"}  # cached: lister not called
    clock.now = 61
    assert expected.for_topic("t", set()) == {"a", "b"}  # error: last good listing
    assert expected.list_errors == 1
    clock.now = 122
    assert expected.for_topic("t", set()) == {"a"}


def test_listing_error_with_no_history_reports_configured_only() -> None:
    def broken(topic: str) -> list[str]:
        raise RuntimeError("down")

    expected = ExpectedSubscriptions({"t": {"c"}}, set(), broken)
    assert expected.for_topic("t", set()) == {"c"}


def test_lose_fraction_is_stable_and_close_to_the_fraction() -> None:
    faults = Faults.lose_fraction(0.02)
    ids = [f"event-{i}" for i in range(20_000)]
    lost = [i for i in ids if faults.lose(i)]
    assert lost == [i for i in ids if faults.lose(i)]
    assert 300 <= len(lost) <= 500
    assert not any(Faults.lose_fraction(0).lose(i) for i in ids[:1000])
    assert all(Faults.lose_fraction(1).lose(i) for i in ids[:1000])
