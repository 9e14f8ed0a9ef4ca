"""Expected subscriptions: configured, listed, seen, minus exclusions."""

from __future__ import annotations

import threading

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


class FailingLister:
    """The admin API unreachable: every call fails, and is counted per topic."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, topic: str) -> list[str]:
        self.calls.append(topic)
        raise TimeoutError("deadline exceeded")


def test_a_topic_never_listed_is_retried_only_after_the_refresh() -> None:
    clock = Clock()
    lister = FailingLister()
    topics = [f"t{i}" for i in range(6)]
    expected = ExpectedSubscriptions(
        {t: {"c"} for t in topics}, set(), lister, refresh_seconds=60, clock=clock
    )
    # Six evaluations, 10 s apart, within one refresh period: each topic is tried once.
    for n in range(6):
        clock.now = 10.0 * n
        assert all(expected.standing(t) == {"c"} for t in topics)
    assert lister.calls == topics
    assert expected.list_errors == 6

    clock.now = 60.0
    assert expected.for_topic("t0", {"seen"}) == {"c", "seen"}
    assert lister.calls == [*topics, "t0"]
    assert expected.list_errors == 7


def test_a_listing_in_flight_holds_no_lock_and_is_not_repeated() -> None:
    started, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def slow(topic: str) -> list[str]:
        calls.append(topic)
        if topic == "slow":
            started.set()
            assert release.wait(timeout=30)
        return [f"{topic}-listed"]

    expected = ExpectedSubscriptions({}, set(), slow, refresh_seconds=60, clock=Clock())
    results: list[set[str]] = []
    worker = threading.Thread(target=lambda: results.append(expected.standing("slow")))
    worker.start()
    try:
        assert started.wait(timeout=30)
        # Another topic is listed meanwhile; the same topic is not listed twice at once (its
        # last listing, here none, stands in).
        assert expected.standing("fast") == {"fast-listed"}
        assert expected.standing("slow") == set()
    finally:
        release.set()
        worker.join(timeout=30)
    assert results == [{"slow-listed"}]
    assert calls == ["slow", "fast"]
    assert expected.standing("slow") == {"slow-listed"}
    assert calls == ["slow", "fast"]


def test_lose_fraction_is_stable_and_close_to_the_fraction() -> None:
    faults = Faults.lose_fraction(0.02)
    ids = [f"event-{i}" for i in range(20_000)]
    lost = [i for i in ids if faults.lose(i)]
    assert lost == [i for i in ids if faults.lose(i)]
    assert 300 <= len(lost) <= 500
    assert not any(Faults.lose_fraction(0).lose(i) for i in ids[:1000])
    assert all(Faults.lose_fraction(1).lose(i) for i in ids[:1000])
