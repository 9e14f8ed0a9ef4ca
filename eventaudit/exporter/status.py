"""The status page: what an on-call engineer reads on a wall or a phone, from the latest
evaluation only (no store read): completion per window coloured by the alert thresholds,
missed and dead-lettered counts, completion over the last hour per subscription, and the most
recent missed events linking to their stories. Self-contained: no asset is fetched."""

from __future__ import annotations

import html
import math
import threading
import time
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from eventaudit.contract import epoch_ms
from eventaudit.exporter.collector import EvaluationState
from eventaudit.exporter.snapshot import (
    Snapshot,
    SubscriptionWindow,
    counts_bucket,
    subscription_window,
)
from eventaudit.exporter.story import story_link
from eventaudit.exporter.subscriptions import Expectation
from eventaudit.journal import MissedEvent, parse_listed
from eventaudit.records import BucketCounts, BucketResult

# The alert levels (prometheus/alerts.yml): warning below 99 %, critical below 95 %.
WARNING, CRITICAL = 0.99, 0.95
REFRESH_SECONDS = 30
RECENT_MISSED = 5
CHART_MINUTES = 60
_W, _H = 180, 40

_CSS = """
:root{--ok:#1a7f37;--warn:#b35900;--bad:#c62828;--none:#6b7280;--line:#d0d7de}
*{box-sizing:border-box}
body{font:15px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1f2328;
background:#f6f8fa}
header{background:#24292f;color:#fff;padding:12px 20px;display:flex;flex-wrap:wrap;gap:8px 24px;
align-items:center}
header h1{font-size:20px;margin:0}
.badge{padding:2px 10px;border-radius:12px;font-weight:600}
.badge.up{background:var(--ok)}.badge.down{background:var(--bad)}
main{padding:12px 20px;max-width:1400px}
section{background:#fff;border:1px solid var(--line);border-radius:6px;margin:12px 0;
padding:8px 12px}
h2{font-size:17px;margin:4px 0 8px}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%}
th,td{padding:4px 6px;text-align:right;white-space:nowrap;border-bottom:1px solid var(--line)}
th{font-size:13px;font-weight:600;color:#57606a}td.chart{text-align:center}
th:first-child,td:first-child{text-align:left}
td.rate{font-weight:600;color:#fff;border-radius:4px}
td.ok{background:var(--ok)}td.warn{background:var(--warn)}td.bad{background:var(--bad)}
td.none{background:var(--none)}
.missed{font-size:13px;margin:4px 0 8px 12px}
.missed a{font-family:ui-monospace,monospace}
.note{color:#57606a;font-size:13px}
svg .t99{stroke:var(--ok)}svg .t95{stroke:var(--bad)}
@media (max-width:700px){body{font-size:14px}main{padding:8px}th,td{padding:3px 5px}
td.chart svg{width:110px}}
"""


def _level(rate: float) -> str:
    if math.isnan(rate):
        return "none"
    return "ok" if rate >= WARNING else "warn" if rate >= CRITICAL else "bad"


def _percent(rate: float) -> str:
    return "no traffic" if math.isnan(rate) else f"{rate * 100:.2f}%"


def completion_by_minute(
    snapshot: Snapshot,
    topic: str,
    subscription: str,
    minutes: int = CHART_MINUTES,
    results: Iterable[BucketResult] | None = None,
) -> list[float]:
    """Completion of each minute (or bucket, when longer) of the last `minutes` before the
    frontier, NaN when nothing was expected, from the bucket results (`results`: the topic's,
    when already grouped), counted as the gauges count them. A subscription reported only
    where it has receipts is reported in the window this covers, so a minute without any is
    counted (0 %), not left out."""
    expectation = replace(
        snapshot.expectations.get((topic, subscription), Expectation()), standing=True
    )
    step = max(timedelta(minutes=1), snapshot.bucket)
    slots = max(1, int(timedelta(minutes=minutes) / step))
    per_slot: list[list[BucketResult]] = [[] for _ in range(slots)]
    end = snapshot.frontier_of(topic)
    start = end - step * slots
    chosen = results if results is not None else _of_topic(snapshot, topic)
    for result in chosen:
        if start <= result.start < end:
            per_slot[int((result.start - start) / step)].append(result)
    rates = []
    for slot in per_slot:
        stats = subscription_window(expectation, subscription, slot, end, snapshot.bucket)
        rates.append(stats.completion_rate if stats else math.nan)
    return rates


def _of_topic(snapshot: Snapshot, topic: str) -> list[BucketResult]:
    return [r for (t, _), r in snapshot.buckets.items() if t == topic]


def _chart(rates: list[float], label: str) -> str:
    """An inline SVG line of completion per minute, 0..100 %, with the two alert levels."""

    def y(rate: float) -> float:
        return round(_H - 2 - rate * (_H - 4), 1)

    step = _W / max(1, len(rates) - 1)
    runs: list[list[str]] = [[]]
    dots = []
    for i, rate in enumerate(rates):
        if math.isnan(rate):
            runs.append([])
            continue
        point = f"{round(i * step, 1)},{y(rate)}"
        runs[-1].append(point)
        if rate < CRITICAL:
            dots.append(f'<circle cx="{round(i * step, 1)}" cy="{y(rate)}" r="2" fill="#c62828"/>')
    lines = "".join(
        f'<polyline points="{" ".join(run)}" fill="none" stroke="#24292f" stroke-width="1.5"/>'
        for run in runs
        if len(run) > 1
    )
    lone = "".join(
        f'<circle cx="{run[0].split(",")[0]}" cy="{run[0].split(",")[1]}" r="1.5"/>'
        for run in runs
        if len(run) == 1
    )
    return (
        f'<svg viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img" '
        f'aria-label="{html.escape(label)}">'
        f'<line class="t99" x1="0" x2="{_W}" y1="{y(WARNING)}" y2="{y(WARNING)}" '
        'stroke-dasharray="3 3"/>'
        f'<line class="t95" x1="0" x2="{_W}" y1="{y(CRITICAL)}" y2="{y(CRITICAL)}" '
        'stroke-dasharray="3 3"/>'
        f"{lines}{lone}{''.join(dots)}</svg>"
    )


def recent_missed(
    snapshot: Snapshot,
    topic: str,
    subscription: str,
    keep: int = RECENT_MISSED,
    results: Iterable[BucketResult] | None = None,
) -> list[MissedEvent]:
    """The most recent missed events the bucket results (`results`: the topic's, when already
    grouped) list, newest bucket first: no store read."""
    expectation = snapshot.expectations.get((topic, subscription), Expectation())
    found: list[MissedEvent] = []
    oldest = snapshot.frontier_of(topic) - snapshot.windows[-1].length
    chosen = results if results is not None else _of_topic(snapshot, topic)
    for result in sorted(chosen, key=lambda r: r.start, reverse=True):
        if result.start < oldest or not counts_bucket(
            expectation, result, subscription, snapshot.bucket
        ):
            continue
        counts = result.subscriptions.get(subscription, BucketCounts())
        expected = result.published if counts.expected is None else counts.expected
        if expected == counts.received:
            continue
        listed = (
            result.missed.get(subscription, ())
            if subscription in result.subscriptions
            else result.oldest
        )
        events = [e for e in map(parse_listed, listed) if e is not None]
        found.extend(sorted(events, key=lambda e: (e.publish_time, e.event_id), reverse=True))
        if len(found) >= keep:
            break
    return found[:keep]


def _cells(topic: str, sub: str, label: str, stats: SubscriptionWindow) -> str:
    rate = stats.completion_rate
    attrs = f'data-topic="{html.escape(topic)}" data-subscription="{html.escape(sub)}" ' + (
        f'data-window="{html.escape(label)}"'
    )
    value = "NaN" if math.isnan(rate) else repr(rate)
    return (
        f'<td class="rate {_level(rate)}" {attrs} data-metric="completion_rate" '
        f'data-value="{value}">{_percent(rate)}</td>'
        f'<td {attrs} data-metric="missed_events" data-value="{stats.missed}">{stats.missed}</td>'
        f'<td {attrs} data-metric="dead_lettered_events" data-value="{stats.dead_lettered}">'
        f"{stats.dead_lettered}</td>"
    )


def _topic_section(
    snapshot: Snapshot, topic: str, subs: Iterable[str], results: list[BucketResult]
) -> str:
    labels = [w.label for w in snapshot.windows]
    published = snapshot.published.get(topic, {})
    head = "".join(
        f'<th colspan="3">{html.escape(label)}: {published.get(label, 0)} published</th>'
        for label in labels
    )
    sub_head = "<th>completion</th><th>missed</th><th>dead-lettered</th>" * len(labels)
    # Narrow screens: the table scrolls sideways, the subscription and its chart first.
    rows, lists = [], []
    for sub in subs:
        windows = snapshot.subscriptions[(topic, sub)]
        cells = "".join(
            _cells(topic, sub, label, windows[label])
            if label in windows
            else '<td colspan="3">not reported</td>'
            for label in labels
        )
        chart = _chart(
            completion_by_minute(snapshot, topic, sub, results=results),
            f"completion of {sub}, last hour",
        )
        rows.append(f'<tr><td>{html.escape(sub)}</td><td class="chart">{chart}</td>{cells}</tr>')
        if any(w.missed for w in windows.values()):
            events = recent_missed(snapshot, topic, sub, results=results)
            items = "".join(
                f'<li><a href="{html.escape(story_link(e.event_id, epoch_ms(e.publish_time)))}">'
                f"{html.escape(e.event_id)}</a> published "
                f"{e.publish_time:%H:%M:%S}"
                + (
                    f", dead-lettered after {e.dead_letter_attempts} attempts"
                    if e.dead_letter_attempts
                    else ", lost"
                )
                + "</li>"
                for e in events
            )
            lists.append(
                f'<div class="missed" data-missed-for="{html.escape(sub)}">Most recent missed '
                f"on <b>{html.escape(sub)}</b>:<ul>{items}</ul></div>"
            )
    return (
        f'<section data-topic="{html.escape(topic)}"><h2>{html.escape(topic)}</h2>'
        f'<div class="scroll"><table><tr><th rowspan="2">subscription</th>'
        f'<th rowspan="2">last hour, per minute</th>{head}</tr><tr>{sub_head}</tr>'
        f"{''.join(rows)}</table></div>{''.join(lists)}</section>"
    )


_cache_lock = threading.Lock()
_cached: tuple[Snapshot | None, str] = (None, "")


def _body(snapshot: Snapshot) -> str:
    """The page's numbers, made once per evaluation: a page refreshed by every wall screen
    and phone costs one rendering per evaluation."""
    global _cached
    with _cache_lock:
        if _cached[0] is snapshot:
            return _cached[1]
    by_topic: dict[str, list[str]] = {}
    for topic, sub in sorted(snapshot.subscriptions):
        by_topic.setdefault(topic, []).append(sub)
    results: dict[str, list[BucketResult]] = {}
    for (topic, _), result in snapshot.buckets.items():
        results.setdefault(topic, []).append(result)
    body = "".join(
        _topic_section(snapshot, t, subs, results.get(t, []))
        for t, subs in sorted(by_topic.items())
    )
    if snapshot.unsupported:
        items = "".join(
            f"<li>{html.escape(t)} / {html.escape(s)}: {html.escape(why)}</li>"
            for (t, s), why in sorted(snapshot.unsupported.items())
        )
        body += f'<section><h2>Not audited</h2><ul class="note">{items}</ul></section>'
    if not by_topic:
        body += '<section><p class="note">No topic reported yet.</p></section>'
    with _cache_lock:
        _cached = (snapshot, body)
    return body


def render(state: EvaluationState) -> str:
    """The whole page, from the latest evaluation (only the health when it is not served)."""
    up, snapshot, reason = state.current()
    if up:
        badge = '<span class="badge up" data-up="1">up</span>'
    else:
        why = html.escape(reason or "no evaluation yet")
        badge = f'<span class="badge down" data-up="0">DOWN: {why}</span>'
    facts = [f"settle delay {state.settle_seconds:g}s"]
    if state.last_success is not None:
        age = time.time() - state.last_success
        facts.append(f"last evaluation {age:.0f}s ago, took {state.duration:.2f}s")
    body = ""
    if up and snapshot is not None:
        when = snapshot.frontier.astimezone(UTC)
        facts.insert(
            0, f'settled up to <b data-frontier="{when.isoformat()}">{when:%H:%M:%S} UTC</b>'
        )
        body = _body(snapshot)
    generated = datetime.now(UTC)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<title>eventaudit</title><style>{_CSS}</style></head>
<body><header><h1>eventaudit</h1>{badge}<span>{" · ".join(facts)}</span></header>
<main>{body}
<p class="note">Completion is received / expected events over settled buckets; colours follow
the alerts: green from 99 %, orange from 95 %, red below. Refreshes every {REFRESH_SECONDS} s
(page made {generated:%H:%M:%S} UTC). <a href="/metrics">/metrics</a> ·
<a href="/healthz">/healthz</a></p></main></body></html>"""
