"""The status page's chart, the story's trace forms and search hours, and the lookup
command's rendering: pure logic on an evaluation of the in-memory store."""

from __future__ import annotations

import html
import io
import math
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from eventaudit.exporter import lookup
from eventaudit.exporter.buckets import Window
from eventaudit.exporter.evaluator import Evaluator, Snapshot
from eventaudit.exporter.status import completion_by_minute
from eventaudit.exporter.story import MAX_SEARCH_HOURS, search_hours, trace_forms
from eventaudit.exporter.subscriptions import ExpectedSubscriptions
from eventaudit.records import PublishRecord, Receipt
from tests.fakes import MemoryStore

TOPIC = "orders"
NOW = datetime(2026, 11, 27, 12, 30, 40, tzinfo=UTC)


def _evaluated(windows: list[Window] | None = None) -> Snapshot:
    """An event a minute from 12:00 to 12:29; `orders-audit` (configured) receives the even
    minutes, `orders-wanderer` (neither configured nor listed) minutes 20 to 24 only."""
    store = MemoryStore()
    for minute in range(30):
        when = datetime(2026, 11, 27, 12, minute, 5, tzinfo=UTC)
        store.insert_publish_records(
            [PublishRecord(f"e{minute}", "a" * 32, TOPIC, "{}", "m", when)], when
        )
        subs = (["orders-audit"] if minute % 2 == 0 else []) + (
            ["orders-wanderer"] if 20 <= minute < 25 else []
        )
        store.record_receipts(
            [Receipt(s, f"e{minute}", TOPIC, None, "m", when, when, when) for s in subs], when
        )
    expected = ExpectedSubscriptions({TOPIC: {"orders-audit"}}, set(), None)
    hour = [Window("1h", timedelta(hours=1))]
    evaluator = Evaluator(
        store, expected, windows or hour, timedelta(seconds=10), timedelta(seconds=30)
    )
    return evaluator.evaluate(NOW)


def test_the_chart_counts_each_minute_as_the_gauges_do() -> None:
    snapshot = _evaluated()
    rates = completion_by_minute(snapshot, TOPIC, "orders-audit")
    assert len(rates) == 60
    # Frontier 12:30:10: the last 60 slots are 11:30:10 .. 12:30:10, one event in each minute.
    observed = [r for r in rates if not math.isnan(r)]
    assert observed == [1.0 if i % 2 == 0 else 0.0 for i in range(30)]
    stats = snapshot.subscriptions[(TOPIC, "orders-audit")]["1h"]
    assert sum(observed) == stats.received


def test_a_subscription_reported_for_its_receipts_shows_its_empty_minutes_as_loss() -> None:
    snapshot = _evaluated()
    rates = [
        r for r in completion_by_minute(snapshot, TOPIC, "orders-wanderer") if not math.isnan(r)
    ]
    assert rates == [0.0] * 20 + [1.0] * 5 + [0.0] * 5  # not gaps: the 1h gauge counts 25 missed
    assert snapshot.subscriptions[(TOPIC, "orders-wanderer")]["1h"].missed == 25


def test_without_a_publish_time_a_lookup_reads_at_most_three_hours() -> None:
    month = [Window("30d", timedelta(days=30))]
    snapshot = _evaluated(month)
    hours = search_hours(snapshot, NOW + timedelta(days=3), None)
    assert hours == [datetime(2026, 11, 27, h, tzinfo=UTC) for h in (13, 12, 11)]
    assert len(hours) == MAX_SEARCH_HOURS
    named = search_hours(snapshot, NOW, datetime(2026, 11, 1, 7, 59, tzinfo=UTC))
    assert named == [datetime(2026, 11, 1, 7, tzinfo=UTC)]


@pytest.mark.parametrize(
    ("trace", "project", "forms"),
    [
        ("a" * 32, "p", {"traceID": "a" * 32, "w3cTraceId": "a" * 32,
                         "cloudTrace": f"projects/p/traces/{'a' * 32}"}),
        ("a" * 32, "", {"traceID": "a" * 32, "w3cTraceId": "a" * 32}),
        ("A" * 32, "p", {"traceID": "A" * 32}),
        ("", "p", {"traceID": ""}),
        ("a" * 31, "p", {"traceID": "a" * 31}),
    ],
)  # fmt: skip
def test_trace_forms_only_claim_what_the_id_is(
    trace: str, project: str, forms: dict[str, str]
) -> None:
    assert trace_forms(trace, project) == forms


STORY: dict[str, Any] = {
    "eventID": "e1",
    "published": [
        {
            "topic": TOPIC, "publishTime": "2026-11-27T12:00:00+00:00", "messageId": "7",
            "options": "{}", "trace": {"traceID": "a" * 32},
            "subscriptions": [
                {"subscription": "s-ok", "verdict": "received", "reason": "counted received",
                 "received": True, "deliveries": 2, "firstReceiveTime": "t1",
                 "deliveryLatencySeconds": 0.25, "deadLettered": None},
                {"subscription": "s-odd", "verdict": "received", "reason": "counted received",
                 "received": True, "deliveries": 1, "firstReceiveTime": None,
                 "deliveryLatencySeconds": None, "deadLettered": None},
                {"subscription": "s-dl", "verdict": "dead_lettered", "reason": "counted missed",
                 "received": False, "deliveries": 0, "deadLettered": {"deliveryAttempts": 5}},
            ],
        }
    ],
}  # fmt: skip


def test_the_command_renders_a_story_even_without_a_latency() -> None:
    assert lookup.render(STORY).splitlines() == [
        "event e1",
        f"  published to {TOPIC} at 2026-11-27T12:00:00+00:00 (message 7, trace {'a' * 32}, "
        "Options {})",
        "    s-ok: received, 2 deliveries, first at t1 (0.250 s after publish): counted received",
        "    s-odd: received, 1 deliveries, first at None: counted received",
        "    s-dl: dead_lettered, dead-lettered after 5 attempts: counted missed",
    ]


class Answer(io.BytesIO):
    """What urlopen returns, as a context manager."""

    def __enter__(self) -> Answer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        (b'{"unexpected": 1}', 2, "not an event story"),
        (b"[1, 2]", 2, "not an event story"),
        (b"not json", 2, "no usable answer from the exporter"),
    ],
)
def test_an_answer_that_is_not_a_story_exits_2(
    monkeypatch: pytest.MonkeyPatch, body: bytes, code: int, message: str
) -> None:
    monkeypatch.setattr(lookup.urllib.request, "urlopen", lambda url, timeout: Answer(body))
    err = io.StringIO()
    assert lookup.main(["e1"], io.StringIO(), err) == code
    assert message in err.getvalue()


def test_a_hostile_filter_in_the_not_audited_list_is_escaped() -> None:
    from eventaudit.exporter.collector import EvaluationState
    from eventaudit.exporter.status import render
    from eventaudit.exporter.subscriptions import SubscriptionInfo

    hostile = 'attributes.k = "\\q<script>alert(1)</script>"'
    store = MemoryStore()
    when = datetime(2026, 11, 27, 12, 0, 5, tzinfo=UTC)
    store.insert_publish_records([PublishRecord("e1", "a" * 32, TOPIC, "{}", "m", when)], when)
    expected = ExpectedSubscriptions(
        {TOPIC: set()}, set(), lambda topic: [SubscriptionInfo("odd-sub", hostile)]
    )
    hour = [Window("1h", timedelta(hours=1))]
    snapshot = Evaluator(
        store, expected, hour, timedelta(seconds=10), timedelta(seconds=30)
    ).evaluate(NOW)
    assert "<script>" in snapshot.unsupported[(TOPIC, "odd-sub")]  # the error quotes the filter
    state = EvaluationState(settle_seconds=30)
    state.succeeded(snapshot, 0.1)
    page = render(state)
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


# Every accepted eventID, as the status page and /api/v1/missed link to its story: `.` and `..`
# are path segments a browser or curl removes (RFC 3986 5.2.4), so their links went elsewhere.
LINKED_IDS = [".", "..", "...", "a:b", "-", "_", "e.1", "x" * 128]


def _missed_everywhere(event_ids: list[str]) -> tuple[MemoryStore, Snapshot]:
    store = MemoryStore()
    for i, event_id in enumerate(event_ids):
        when = datetime(2026, 11, 27, 12, 20, i, tzinfo=UTC)
        store.insert_publish_records(
            [PublishRecord(event_id, "a" * 32, TOPIC, "{}", "m", when)], when
        )
    expected = ExpectedSubscriptions({TOPIC: {"orders-audit"}}, set(), None)
    hour = [Window("1h", timedelta(hours=1))]
    evaluator = Evaluator(store, expected, hour, timedelta(seconds=10), timedelta(seconds=30))
    return store, evaluator.evaluate(NOW)


@pytest.mark.parametrize("event_id", LINKED_IDS)
def test_every_story_link_resolves_to_the_events_story(event_id: str) -> None:
    from urllib.parse import urljoin, urlsplit

    from prometheus_client import CollectorRegistry

    from eventaudit.exporter.app import ExporterDeps, create_app
    from eventaudit.exporter.collector import EvaluationState
    from eventaudit.exporter.status import render

    store, snapshot = _missed_everywhere([event_id])
    state = EvaluationState(settle_seconds=30)
    state.succeeded(snapshot, 0.1)
    client = create_app(ExporterDeps(store, state, CollectorRegistry())).test_client()
    page = render(state)
    [page_link] = re.findall(r'<li><a href="([^"]*)">', page)
    missed = client.get(f"/api/v1/missed?topic={TOPIC}&subscription=orders-audit&window=1h")
    [event] = missed.get_json()["events"]
    assert html.unescape(page_link) == event["story"]
    # Resolved as a browser resolves it (dot segments removed), then asked.
    url = urlsplit(urljoin("http://127.0.0.1:9800/", event["story"]))
    resp = client.get(url.path, query_string=url.query)
    assert resp.status_code == 200, (event["story"], url)
    assert resp.get_json()["eventID"] == event_id
    assert resp.get_json()["published"][0]["publishTime"] == "2026-11-27T12:20:00+00:00"
