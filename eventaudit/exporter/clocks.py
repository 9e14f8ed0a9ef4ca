"""What a process's wall clock can be trusted for, by its monotonic clock.

Since a process started, its wall clock minus its monotonic clock should stay put. Where it
steps (NTP, a VM restored, an operator), each reading is as believable as the other:
- what is forgotten or deleted goes by the earliest the clock could mean (`earliest`), what
  is refused as too far ahead by the latest (`latest`): a step never loses data;
- what is served or judged (windows, other replicas' leases) goes by the clock believed: a
  step is believed once it has held for `confirm` seconds of the monotonic clock (before,
  time goes on from before the step), so a clock stepped for a pass moves nothing.
Pure: the caller reads both clocks and hands them in.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime


@dataclass(frozen=True, slots=True)
class Reading:
    """One reading of both clocks, judged against the earlier ones."""

    earliest: datetime
    latest: datetime
    believed: datetime
    stepped: float
    """seconds the wall clock stepped since the previous reading (0: within the tolerance)"""


class SteppedClock:
    """Readings of one process's clocks: steps over `tolerance` seconds are counted by the
    caller, believed after `confirm` seconds."""

    def __init__(self, tolerance: float, confirm: float) -> None:
        self._tolerance = tolerance
        self._confirm = confirm
        self._low: float | None = None
        self._high: float | None = None
        self._last: float | None = None
        self._believed: float | None = None
        self._suspect: tuple[float, float] | None = None
        """a step not believed yet: (its offset, the monotonic time it was first read)"""

    def read(self, wall: datetime, monotonic: float) -> Reading:
        """Judge a reading of the wall clock taken at `monotonic`."""
        offset = wall.timestamp() - monotonic
        stepped = 0.0
        if self._last is not None and abs(offset - self._last) > self._tolerance:
            stepped = offset - self._last
        self._last = offset
        self._low = offset if self._low is None else min(self._low, offset)
        self._high = offset if self._high is None else max(self._high, offset)
        if self._believed is None or abs(offset - self._believed) <= self._tolerance:
            self._believed, self._suspect = offset, None
        elif self._suspect is None or abs(offset - self._suspect[0]) > self._tolerance:
            self._suspect = (offset, monotonic)
        elif monotonic - self._suspect[1] >= self._confirm:
            self._believed, self._suspect = offset, None
        return Reading(
            min(wall, _at(self._low + monotonic)),
            max(wall, _at(self._high + monotonic)),
            _at(self._believed + monotonic),
            stepped,
        )

    def earliest(self, wall: datetime, monotonic: float) -> datetime:
        """The earliest `wall` could mean, without taking it as a reading."""
        return wall if self._low is None else min(wall, _at(self._low + monotonic))


def _at(seconds: float) -> datetime:
    """Epoch seconds as a UTC time, to the millisecond (as the store keeps times)."""
    return datetime.fromtimestamp(round(seconds * 1000) / 1000, UTC)
