"""SteppedClock: what a stepped wall clock is trusted for (pure, table-driven)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from eventaudit.exporter.clocks import SteppedClock

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def _s(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("readings", "expected"),
    [
        # (wall seconds after T0, monotonic) -> (earliest, latest, believed, stepped) of the last
        ([(0, 0), (10, 10)], (10, 10, 10, 0)),
        ([(0, 0), (10, 10), (10.5, 11)], (10.5, 11, 10.5, 0)),  # a slew within tolerance
        ([(0, 0), (10, 10), (4520, 20)], (20, 4520, 20, 4500)),  # 75 min ahead: not believed
        ([(0, 0), (10, 10), (4520, 20), (4530, 30)], (30, 4530, 30, 0)),  # held 10 s
        ([(0, 0), (4510, 10), (4520, 20), (4540, 40)], (40, 4540, 4540, 0)),  # held 30 s
        ([(0, 0), (10, 10), (-4480, 20)], (-4480, 20, 20, -4500)),  # back: earliest follows
        ([(0, 0), (-4490, 10), (20, 20)], (-4480, 20, 20, 4500)),  # put right at once
        ([(0, 0), (-4490, 10), (20, 20), (50, 50)], (-4450, 50, 50, 0)),  # believed again
    ],
)
def test_readings(
    readings: list[tuple[float, float]], expected: tuple[float, float, float, float]
) -> None:
    clock = SteppedClock(tolerance=10.0, confirm=30.0)
    for wall, monotonic in readings:
        reading = clock.read(_s(wall), monotonic)
    earliest, latest, believed, stepped = expected
    assert (reading.earliest, reading.latest, reading.believed, reading.stepped) == (
        _s(earliest),
        _s(latest),
        _s(believed),
        stepped,
    )


def test_earliest_without_a_reading() -> None:
    clock = SteppedClock(tolerance=10.0, confirm=30.0)
    assert clock.earliest(_s(5), 5) == _s(5)  # nothing read yet: the wall clock
    clock.read(_s(0), 0)
    clock.read(_s(-100), 10)  # stepped back 110 s
    assert clock.earliest(_s(4600), 20) == _s(-90)
