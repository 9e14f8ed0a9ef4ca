"""The status page in a real browser: Debian's headless Chromium loads it from a running
exporter (a real HTTP server over FerretDB), and the rendered DOM holds the numbers the
gauges hold."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from eventaudit.contract import epoch_ms
from eventaudit.exporter.app import ExporterDeps, create_app
from eventaudit.exporter.buckets import Window
from eventaudit.exporter.collector import CompletionCollector, EvaluationState
from eventaudit.exporter.evaluator import Evaluator
from eventaudit.exporter.loop import EvaluationLoop
from eventaudit.exporter.missed import MissedAnswers
from eventaudit.exporter.subscriptions import ExpectedSubscriptions
from eventaudit.records import PublishRecord, Receipt
from eventaudit.serving import BackgroundServer, ServerLimits
from eventaudit.store import MongoStore
from tools import chromium, stack

BUCKET = timedelta(seconds=10)
SETTLE = timedelta(seconds=30)
TOPIC, HEALTHY, LOSSY, SILENT = "orders", "orders-audit", "orders-billing", "orders-silent"
NOW = datetime(2026, 11, 27, 12, 30, 45, tzinfo=UTC)


class Cells(HTMLParser):
    """Every element carrying data-metric, and the missed-event links."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[tuple[str, str, str, str], str] = {}
        self.links: list[str] = []
        self.up: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if "data-metric" in a:
            key = (a["data-topic"], a["data-subscription"], a["data-window"], a["data-metric"])
            self.values[key] = a["data-value"]
        if tag == "a" and a.get("href", "").startswith("/api/v1/events/"):
            self.links.append(a["href"])
        if "data-up" in a:
            self.up = a["data-up"]


def _seed(store: MongoStore) -> None:
    """An event every 5 s for the last 30 minutes; LOSSY misses one in ten (one of those
    dead-lettered), HEALTHY receives all, SILENT nothing."""
    start = NOW - timedelta(minutes=30)
    records, receipts = [], []
    for i in range(360):
        when = start + timedelta(seconds=5 * i)
        records.append(PublishRecord(f"e{i}", f"{i:032x}", TOPIC, "{}", f"m{i}", when))
        receipts.append(Receipt(HEALTHY, f"e{i}", TOPIC, None, "m", when, when, when))
        if i % 10:
            receipts.append(Receipt(LOSSY, f"e{i}", TOPIC, None, "m", when, when, when))
    store.insert_publish_records(records, NOW)
    store.record_receipts(receipts, NOW)
    letter_time = start + timedelta(seconds=5 * 350)
    store.record_receipts(
        [
            Receipt(
                LOSSY,
                "e350",
                TOPIC,
                None,
                "m",
                letter_time,
                letter_time,
                letter_time,
                5,
                "orders-dlq-audit",
            )
        ],
        NOW,
    )


@pytest.fixture
def exporter_url(store: MongoStore):
    _seed(store)
    expected = ExpectedSubscriptions({TOPIC: {HEALTHY, LOSSY, SILENT}}, set(), None)
    windows = [Window(w, timedelta(minutes=m)) for w, m in (("1m", 1), ("5m", 5), ("1h", 60))]
    evaluator = Evaluator(store, expected, windows, BUCKET, SETTLE)
    state = EvaluationState(settle_seconds=SETTLE.total_seconds())
    registry = CollectorRegistry()
    registry.register(CompletionCollector(state, expected))
    loop = EvaluationLoop(evaluator, state, store, BUCKET, timedelta(days=1), clock=lambda: NOW)
    assert loop.run_once()
    app = create_app(ExporterDeps(store, state, registry, MissedAnswers(), "proj-a"))
    server = BackgroundServer(app, f"127.0.0.1:{stack.free_port()}", ServerLimits(4))
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}", registry
    finally:
        server.stop(timeout=5)


def test_the_page_in_a_browser_holds_the_gauges_numbers(exporter_url, tmp_path: Path) -> None:
    url, registry = exporter_url
    cells = Cells()
    cells.feed(chromium.dump_dom(url + "/"))
    assert cells.up == "1"
    checked = 0
    for sub in (HEALTHY, LOSSY, SILENT):
        for window in ("1m", "5m", "1h"):
            labels = {"topic": TOPIC, "subscription": sub, "window": window}
            for metric in ("completion_rate", "missed_events", "dead_lettered_events"):
                gauge = registry.get_sample_value(f"eventaudit_{metric}", labels)
                shown = cells.values[(TOPIC, sub, window, metric)]
                assert gauge is not None and float(shown) == pytest.approx(gauge), (labels, metric)
                checked += 1
    assert checked == 27
    lossy_1h = {"topic": TOPIC, "subscription": LOSSY, "window": "1h"}
    assert registry.get_sample_value("eventaudit_missed_events", lossy_1h) == 36
    assert registry.get_sample_value("eventaudit_dead_lettered_events", lossy_1h) == 1
    # The most recent missed events link to their stories: LOSSY's, then SILENT's, 5 each.
    assert len(cells.links) == 10
    newest = epoch_ms(NOW - timedelta(minutes=30) + timedelta(seconds=5 * 350))
    assert cells.links[0] == f"/api/v1/events/e350?publishTime={newest}"


def test_the_page_renders_at_wall_and_phone_sizes(exporter_url, tmp_path: Path) -> None:
    url, _ = exporter_url
    for width, height in ((1400, 900), (390, 844)):
        path = tmp_path / f"status-{width}.png"
        chromium.screenshot(url + "/", path, width, height)
        assert chromium.png_size(path) == (width, height)
        assert path.stat().st_size > 10_000  # rendered content, not a blank page
