"""The truth, recounted from the stored records alone.

A small pure function, independent of the evaluator: it imports nothing of eventaudit's
folding, journal or partitions. Given the publish records, receipts and dead-letter records
as documents, it says for every (topic, subscription) what a window of publish time holds.

The rules, from docs/semantics.md:
- an event is a publish record: (topic, eventID) within the hour of its publishTime (an
  eventID published again in another hour is another event);
- a receipt or dead letter belongs to the event of its (topic, eventID, hour of its
  publishTime), whatever the message's own publishTime within that hour (a caller's retry);
- `received` counts events with a receipt on the subscription; it is counted in the
  event's bucket; `missed` = published - received, listed by eventID;
- `duplicates` = deliveries beyond the first, of the receipts counted in the window (at the
  event's publish time, or at their own when they match no event: `unmatched`);
- `dead_lettered` = missed events with a dead letter of the subscription.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

_HOUR_MS = 3_600_000


@dataclass(frozen=True)
class Truth:
    """One subscription over one window."""

    published: int
    received: int
    duplicates: int
    unmatched: int
    dead_lettered: int
    missed: tuple[str, ...]
    """eventIDs, sorted by (publish time, eventID)"""
    verdicts: tuple[tuple[str, datetime, str], ...] = ()
    """(eventID, publish time, `received` / `missed` / `dead_lettered`) of every event"""


def _ms(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _time(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _identity(doc: Mapping[str, Any]) -> tuple[str, str, int]:
    ms = _ms(doc["publishTime"])
    return doc["topic"], doc["eventID"], ms - ms % _HOUR_MS


def recount(
    publishes: Iterable[Mapping[str, Any]],
    receipts: Iterable[Mapping[str, Any]],
    dead_letters: Iterable[Mapping[str, Any]],
    subscriptions: Mapping[str, Collection[str]],
    start: datetime,
    end: datetime,
) -> dict[tuple[str, str], Truth]:
    """Every (topic, subscription) of `subscriptions` over publish times [start, end)."""
    lo, hi = _ms(start), _ms(end)
    events: dict[tuple[str, str, int], int] = {}
    for doc in publishes:
        events.setdefault(_identity(doc), _ms(doc["publishTime"]))
    got: dict[tuple[str, tuple[str, str, int]], Mapping[str, Any]] = {}
    for doc in receipts:
        got[(doc["subscription"], _identity(doc))] = doc
    dead = {(doc["subscription"], _identity(doc)) for doc in dead_letters}
    truths: dict[tuple[str, str], Truth] = {}
    for topic, subs in subscriptions.items():
        mine = sorted(
            ((ms, ident) for ident, ms in events.items() if ident[0] == topic and lo <= ms < hi),
            key=lambda item: (item[0], item[1][1]),
        )
        for sub in subs:
            missed = [ident for _, ident in mine if (sub, ident) not in got]
            duplicates = unmatched = 0
            for (s, ident), doc in got.items():
                if s != sub or ident[0] != topic:
                    continue
                at = events.get(ident)
                counted_at = at if at is not None else _ms(doc["publishTime"])
                if not lo <= counted_at < hi:
                    continue
                duplicates += int(doc["deliveries"]) - 1
                unmatched += at is None
            truths[(topic, sub)] = Truth(
                published=len(mine),
                received=len(mine) - len(missed),
                duplicates=duplicates,
                unmatched=unmatched,
                dead_lettered=sum(1 for ident in missed if (sub, ident) in dead),
                missed=tuple(ident[1] for ident in missed),
                verdicts=tuple(
                    (
                        ident[1],
                        _time(ms),
                        "received"
                        if (sub, ident) in got
                        else "dead_lettered"
                        if (sub, ident) in dead
                        else "missed",
                    )
                    for ms, ident in mine
                ),
            )
    return truths
