"""One event's story: where it was published, and what each subscription did with it.

Built from the records (one `_id` lookup per collection: the hour's publish records, receipts
and dead letters) and the latest evaluation: for every subscription expected on the event's
topic, the verdict that evaluation counted for the event's bucket.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode

from eventaudit.contract import epoch_ms, from_epoch_ms, parse_ascii_int
from eventaudit.exporter.buckets import floor_to_bucket
from eventaudit.exporter.snapshot import Snapshot, counts_bucket
from eventaudit.exporter.subscriptions import Expectation
from eventaudit.journal import BucketDigest
from eventaudit.partitions import RECORD_PARTITION_MS
from eventaudit.store import ExporterStore, FoundEvent

HOUR = timedelta(milliseconds=RECORD_PARTITION_MS)

# What the latest evaluation counted for the event on a subscription.
VERDICTS = (
    "received",  # counted received
    "received_late",  # counted missed by the latest evaluation; a receipt is stored since
    "missed",  # counted missed (lost)
    "dead_lettered",  # counted missed: Pub/Sub moved it to the dead-letter topic
    "filtered",  # received, though the subscription's filter excludes it (the emulator)
    "not_expected",  # the filter excludes it, or the subscription did not exist then
    "not_yet_settled",  # its bucket is not evaluated yet
    "not_yet_counted",  # settled, but its publish record was not folded by the evaluation
    "not_counted",  # its bucket was counted under another filter (or not at all) for it
    "outside_windows",  # its bucket is older than the longest window
    "not_audited",  # the subscription's filter cannot be evaluated
)
# Without a publish time, the newest hours looked in (each a collection read on FerretDB).
MAX_SEARCH_HOURS = 3
_TRACE_ID = re.compile(r"[0-9a-f]{32}")


def search_hours(
    snapshot: Snapshot, now: datetime, publish_time: datetime | None
) -> list[datetime]:
    """The hourly collections to look in, newest first: the publish time's, or every hour a
    window reaches (from the oldest bucket a window sums to now, or to an hour past the
    evaluation when that is earlier)."""
    if publish_time is not None:
        return [floor_to_bucket(publish_time, HOUR)]
    oldest = snapshot.frontier - snapshot.windows[-1].length
    hour = floor_to_bucket(min(now, snapshot.evaluated_at + HOUR), HOUR)
    hours = [hour]
    while len(hours) < MAX_SEARCH_HOURS and hours[-1] > oldest:
        hours.append(hours[-1] - HOUR)
    return hours


def story_link(event_id: str, publish_time_ms: int | None = None) -> str:
    """The path (and query) of an event's story, for every accepted eventID.

    `.` and `..` are dot segments: browsers and curl remove them from a path before asking
    (RFC 3986, 5.2.4), so `/api/v1/events/..` went to `/api/v1/`. Their stories are asked
    by query, `/api/v1/events?eventID=..`, which every client leaves alone.
    """
    query = {} if publish_time_ms is None else {"publishTime": str(publish_time_ms)}
    if event_id in (".", ".."):
        return "/api/v1/events?" + urlencode({"eventID": event_id, **query})
    path = "/api/v1/events/" + quote(event_id, safe=":")
    return f"{path}?{urlencode(query)}" if query else path


def trace_forms(trace_id: str, project: str) -> dict[str, str]:
    """A trace id as Cloud Trace and W3C tools take it (a W3C trace id is 32 lowercase hex;
    Cloud Trace's name needs the project)."""
    forms = {"traceID": trace_id}
    if _TRACE_ID.fullmatch(trace_id):
        forms["w3cTraceId"] = trace_id
        if project:
            forms["cloudTrace"] = f"projects/{project}/traces/{trace_id}"
    return forms


def event_story(
    snapshot: Snapshot,
    store: ExporterStore,
    event_id: str,
    hours: Sequence[datetime],
    project: str,
) -> dict[str, Any] | None:
    """The story of `event_id`, or None when no publish record of it is in `hours`: one `_id`
    lookup per hour for its publish records, then per topic one in its hour's receipts, one in
    its dead letters, and (for a settled bucket a window reaches) the bucket's digest, which
    says what the evaluation counted. Raises StoreError."""
    topics = set(snapshot.published) | {t for t, _ in snapshot.expectations}
    found = store.find_event(
        event_id, {t: _known_subscriptions(snapshot, t) for t in topics}, hours
    )
    if not found:
        return None
    stories = [_on_topic(snapshot, store, event_id, record, project) for record in found]
    return {"eventID": event_id, "published": sorted(stories, key=lambda s: s["topic"])}


def _known_subscriptions(snapshot: Snapshot, topic: str) -> set[str]:
    """The subscriptions the evaluation reports on `topic`, and those it cannot audit."""
    keys = [*snapshot.subscriptions, *snapshot.unsupported]
    return {sub for t, sub in keys if t == topic}


def _on_topic(
    snapshot: Snapshot, store: ExporterStore, event_id: str, found: FoundEvent, project: str
) -> dict[str, Any]:
    doc = found.published
    topic, published = str(doc["topic"]), doc["publishTime"]
    start = floor_to_bucket(published, snapshot.bucket)
    subs = _known_subscriptions(snapshot, topic)
    by_sub = {r["subscription"]: r for r in found.receipts}
    dead_by_sub = {d["subscription"]: d for d in found.dead}
    # The digest says what the evaluation counted; read only for a bucket a window counts.
    end = snapshot.frontier_of(topic)
    counted = end - snapshot.windows[-1].length <= start < end
    digest = store.load_digest(topic, start) if counted and subs else BucketDigest(topic, start)
    trace = str(doc.get("traceID") or "")
    return {
        "topic": topic,
        "publishTime": published.isoformat(),
        "publishTimeMs": epoch_ms(published),
        "bucket": start.isoformat(),
        "messageId": doc.get("messageId"),
        "options": doc.get("options", "{}"),
        "attributes": doc.get("attributes", ""),
        "trace": trace_forms(trace, project),
        "subscriptions": [
            _details(
                sub,
                _verdict(
                    snapshot,
                    topic,
                    sub,
                    event_id,
                    doc,
                    by_sub.get(sub),
                    dead_by_sub.get(sub),
                    digest,
                ),
                published,
                by_sub.get(sub),
                dead_by_sub.get(sub),
            )
            for sub in sorted(subs)
        ],
    }


def _details(
    sub: str,
    counted: tuple[str, str],
    published: datetime,
    receipt: dict[str, Any] | None,
    dead: dict[str, Any] | None,
) -> dict[str, Any]:
    """One subscription's part of the story: the verdict counted, and what is stored."""
    verdict, reason = counted
    out: dict[str, Any] = {
        "subscription": sub,
        "verdict": verdict,
        "reason": reason,
        "received": receipt is not None,
        "firstReceiveTime": None,
        "lastReceiveTime": None,
        "deliveries": 0,
        "deliveryLatencySeconds": None,
        "deliveryAttempt": None,
        "deadLettered": None,
    }
    if receipt is not None:
        first = receipt.get("receiveTime")
        out |= {
            "firstReceiveTime": _iso(first),
            "lastReceiveTime": _iso(receipt.get("lastReceiveTime")),
            "deliveries": receipt.get("deliveries", 0),
            "deliveryLatencySeconds": (first - published).total_seconds()
            if isinstance(first, datetime)
            else None,
            "deliveryAttempt": receipt.get("deliveryAttempt"),
        }
    if dead is not None:
        out["deadLettered"] = {
            "deliveryAttempts": dead.get("deliveryAttempts"),
            "deadLetterSubscription": dead.get("deadLetterSubscription"),
            "receiveTime": _iso(dead.get("receiveTime")),
        }
    return out


def _iso(value: object) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else None


def _verdict(
    snapshot: Snapshot,
    topic: str,
    sub: str,
    event_id: str,
    doc: dict[str, Any],
    receipt: dict[str, Any] | None,
    dead: dict[str, Any] | None,
    digest: BucketDigest,
) -> tuple[str, str]:
    """What the latest evaluation counted, and why, in the words an on-call engineer reads."""
    start = floor_to_bucket(doc["publishTime"], snapshot.bucket)
    if (topic, sub) in snapshot.unsupported:
        return (
            "not_audited",
            f"its filter cannot be evaluated: {snapshot.unsupported[(topic, sub)]}",
        )
    end = snapshot.frontier_of(topic)
    if start >= end:
        return (
            "not_yet_settled",
            f"evaluated once its bucket settles ({end:%H:%M:%S} so far)",
        )
    if start < end - snapshot.windows[-1].length:
        return "outside_windows", "its bucket is older than the longest window"
    expectation = snapshot.expectations.get((topic, sub), Expectation())
    result = snapshot.buckets.get((topic, start))
    if not expectation.covers(start, snapshot.bucket):
        return "not_expected", "the subscription did not exist when the event was published"
    if expectation.filter is not None and not expectation.filter.matches_encoded(
        str(doc.get("attributes") or "")
    ):
        if receipt is not None:
            return (
                "filtered",
                "received, but its filter excludes the event (Pub/Sub never sends it)",
            )
        return "not_expected", "the subscription's filter excludes the event"
    if result is None or not counts_bucket(expectation, result, sub, snapshot.bucket):
        return "not_counted", "its bucket is not counted for this subscription (another filter)"
    # What the evaluation behind the gauges counted: entries folded by the bucket result's
    # merge stamp (the replica that evaluated the topic may not be this one).
    merged = result.merged
    published = digest.published.get(event_id)
    if published is None or published[2] > merged:
        return "not_yet_counted", "its publish record was not folded by the latest evaluation"
    got = digest.receipts.get(sub, {}).get(event_id)
    if got is not None and got[1] <= merged:
        return "received", "counted received"
    if receipt is not None:
        return "received_late", "counted missed by the latest evaluation; a receipt is stored since"
    gone = digest.dead.get(sub, {}).get(event_id)
    if gone is not None and gone[1] <= merged:
        return "dead_lettered", "counted missed: Pub/Sub moved it to the dead-letter topic"
    if dead is not None:
        return "missed", "counted missed (lost); a dead letter of it is stored since"
    return "missed", "counted missed: no receipt"


def parse_publish_time(text: str) -> datetime | None:
    """`publishTime` as epoch ms (ASCII digits, years 2000..2999); None otherwise."""
    value = parse_ascii_int(text, max_digits=15)
    if value is None or not 946_684_800_000 <= value < 32_503_680_000_000:
        return None
    return from_epoch_ms(value)
