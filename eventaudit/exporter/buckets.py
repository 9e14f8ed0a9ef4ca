"""Bucket and window arithmetic: pure functions over UTC datetimes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

# Used with fullmatch, ASCII digits only: `$` matches before a trailing newline, `\d` and
# int() accept other scripts' digits.
_DURATION = re.compile(r"([1-9][0-9]{0,6})(s|m|h|d)")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Every computation adds or subtracts at most a few durations to the current time; ten years
# each keeps all of them far inside datetime's range (years 1..9999).
MAX_DURATION = timedelta(days=3650)


def parse_duration(text: str) -> timedelta:
    """`30s`, `5m`, `1h`, `7d` (at most 3650d) as a timedelta; ValueError otherwise."""
    match = _DURATION.fullmatch(text)
    if not match:
        raise ValueError(f"duration must look like 30s, 5m, 1h or 7d, got {text!r}")
    duration = timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])
    if duration > MAX_DURATION:
        raise ValueError(f"duration must be at most {MAX_DURATION.days}d, got {text!r}")
    return duration


@dataclass(frozen=True, slots=True)
class Window:
    """A trailing window of settled buckets, labelled as configured (`5m`)."""

    label: str
    length: timedelta

    @classmethod
    def parse(cls, text: str, bucket: timedelta) -> Window:
        """Parse a window and check it is a whole number of buckets."""
        length = parse_duration(text)
        if length % bucket:
            raise ValueError(
                f"window {text} is not a whole number of {bucket.total_seconds():g}s buckets"
            )
        return cls(text, length)


def floor_to_bucket(moment: datetime, bucket: timedelta) -> datetime:
    """Start of the bucket that contains `moment` (buckets are aligned to the epoch)."""
    return moment - ((moment - EPOCH) % bucket)


def settled_frontier(now: datetime, settle: timedelta, bucket: timedelta) -> datetime:
    """Every bucket that ends at or before `now - settle` is settled; they start before this."""
    return floor_to_bucket(now - settle, bucket)


def completion_rate(received: int, published: int) -> float:
    """received / published in [0, 1]; NaN when nothing was published (never a fake 1 or 0)."""
    if published <= 0:
        return float("nan")
    return min(received, published) / published
