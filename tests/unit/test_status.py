"""The status page's chart, the story's trace forms and search hours, and the lookup
command's rendering: pure logic on an evaluation of the in-memory store."""

from __future__ import annotations

import html
import io
import json
import math
import re
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from eventaudit.exporter import lookup
from eventaudit.exporter.buckets import Window
from eventaudit.exporter.evaluator import Evaluator
from eventaudit.exporter.snapshot import Snapshot
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


def _story_of(event_id: str, **sub: Any) -> bytes:
    story = json.loads(json.dumps(STORY))
    story["eventID"] = event_id
    story["published"][0]["subscriptions"][0].update(sub)
    return json.dumps(story).encode()


GOOD = _story_of("e1")
ESC = "\x1b[2J\x1b[31m"  # clear the screen, then red
REAL = "a real connection"  # the row reaches a closed port on this host
NO_REQUEST = "never asked"

# The lookup command is an input surface too: its arguments, and whatever answers at
# --exporter. (argv, answer (status, body), exit code, in stderr, stdout)
LOOKUP_HOSTILE = [
    (["\udcff"], NO_REQUEST, 2, "lookup: malformed eventID", ""),  # a non-UTF-8 argv byte
    (["bad id"], NO_REQUEST, 2, "lookup: malformed eventID", ""),
    (["e" * 129], NO_REQUEST, 2, "lookup: malformed eventID", ""),
    (["e1", "--publish-time", "\udcff"], NO_REQUEST, 2, "--publish-time must be epoch", ""),
    (["e1", "--publish-time", "1e3"], NO_REQUEST, 2, "--publish-time must be epoch", ""),
    (["e1", "--publish-time", "1795780800000\n"], NO_REQUEST, 2, "--publish-time must be", ""),
    (["e1", "--exporter", "http://Us3r:s3cret@127.0.0.1:{port}"], REAL, 2,
     "lookup: no usable answer from the exporter at http://127.0.0.1:{port}: ", ""),
    (["e1", "--exporter", "http://Us3r:s3cret@127.0.0.1:x{port}"], NO_REQUEST, 2,
     "lookup: --exporter must be an http:// or https:// URL", ""),
    (["e1", "--exporter", "file:///etc/passwd"], NO_REQUEST, 2, "--exporter must be", ""),
    (["e1", "--exporter", f"http://127.0.0.1:9800/{ESC}"], NO_REQUEST, 2, "--exporter must", ""),
    (["e1", "--exporter", "http://127.0.0.1:9800/?a=1"], NO_REQUEST, 2, "--exporter must", ""),
    (["e1"], (200, b"not json"), 2, "lookup: no usable answer from the exporter", ""),
    (["e1"], (200, ("[" * 5000 + "]" * 5000).encode()), 2, "no usable answer", ""),
    (["e1"], (200, b'{"a":' * 990 + b"1" + b"}" * 990), 2, "no usable answer", ""),
    (["e1"], (200, b'{"unexpected": 1}'), 2, "lookup: not an event story", ""),
    (["e1"], (200, b"[1, 2]"), 2, "lookup: not an event story", ""),
    (["e1", "--json"], (200, b'{"hello": "world"}'), 2, "lookup: not an event story", ""),
    (["e1", "--json"], (200, b'{"eventID": "e1", "published": []}'), 2, "not an event story", ""),
    (["e1", "--json"], (200, _story_of("e2")), 2, "lookup: the answer is the story of e2", ""),
    (["e1"], (200, _story_of("e1", verdict="lost")), 2, "not an event story", ""),
    (["e1"], (200, b" " * (16 * 2**20 + 1)), 2, "larger than 16 MiB", ""),
    (["e1"], (302, b""), 2, "lookup: 302: ", ""),
    (["e1"], (500, b"<html>oops</html>"), 2, "lookup: 500: ", ""),
    (["e1"], (404, json.dumps({"error": f"{ESC}gone", "status": 404, "searched": []}).encode()),
     1, "lookup: 404: \\x1b[2J\\x1b[31mgone", ""),
    (["e1"], (404, b'{"error": "not found", "status": 404}'), 2, "lookup: 404: not found", ""),
    (["e1"], (200, _story_of("e1", subscription=f"s{ESC}", reason="r\u202e")), 0, "",
     "    s\\x1b[2J\\x1b[31m: received, 2 deliveries, first at t1 (0.250 s after publish): "
     "r\\u202e"),
    (["e1"], (200, GOOD), 0, "", "    s-ok: received, 2 deliveries"),
    (["e1", "--json"], (200, _story_of("e1", reason=ESC)), 0, "", '"reason": "\\u001b[2J'),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "answer", "code", "error", "output"), LOOKUP_HOSTILE)
def test_the_lookup_command_against_hostile_input(
    monkeypatch: pytest.MonkeyPatch, argv, answer, code: int, error: str, output: str
) -> None:
    from tools import stack

    port = stack.free_port()
    argv = [a.replace("{port}", str(port)) for a in argv]
    asked: list[tuple[str, dict[str, str]]] = []
    if answer is not REAL:

        def fake(url: str, headers: dict[str, str]) -> tuple[int, str, bytes]:
            asked.append((url, headers))
            assert answer is not NO_REQUEST, "asked the exporter with a malformed argument"
            status, body = answer
            return status, "Reason", body

        monkeypatch.setattr(lookup, "_get", fake)
    out, err = io.StringIO(), io.StringIO()
    assert lookup.main(argv, out, err) == code
    printed = out.getvalue() + err.getvalue()
    assert error.replace("{port}", str(port)) in err.getvalue()
    assert len(err.getvalue().splitlines()) == (0 if code == 0 else 1), err.getvalue()
    assert output in out.getvalue()
    assert out.getvalue() == "" or code == 0
    assert "\x1b" not in printed and "\u202e" not in printed  # escapes shown, never acted on
    assert "s3cret" not in printed.lower()  # credentials never printed


def test_the_lookup_command_asks_for_every_id_where_its_story_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[tuple[str, dict[str, str]]] = []

    def fake(url: str, headers: dict[str, str]) -> tuple[int, str, bytes]:
        asked.append((url, headers))
        query = parse_qs(urlsplit(url).query)
        return 200, "OK", _story_of(query["eventID"][0] if query else "e1")

    argv = ["--exporter", "https://Us3r:p%40ss@exporter.example:9443/base/"]
    monkeypatch.setattr(lookup, "_get", fake)
    assert lookup.main(["e1", *argv], io.StringIO(), io.StringIO()) == 0
    assert lookup.main(["..", *argv], io.StringIO(), io.StringIO()) == 0
    argv += ["--publish-time", "1795780800000"]
    assert lookup.main([".", *argv], io.StringIO(), io.StringIO()) == 0
    auth = {"Accept": "application/json", "Authorization": "Basic VXMzcjpwQHNz"}  # Us3r:p@ss
    assert asked == [
        ("https://exporter.example:9443/base/api/v1/events/e1", auth),
        ("https://exporter.example:9443/base/api/v1/events?eventID=..", auth),
        ("https://exporter.example:9443/base/api/v1/events?eventID=.&publishTime=1795780800000",
         auth),
    ]  # fmt: skip


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
