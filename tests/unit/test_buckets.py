"""Bucket, window and completion arithmetic."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from eventaudit.exporter.buckets import (
    Window,
    completion_rate,
    floor_to_bucket,
    parse_duration,
    settled_frontier,
)

B = timedelta(seconds=10)


def at(h: int, m: int, s: int, ms: int = 0) -> datetime:
    return datetime(2026, 11, 27, h, m, s, ms * 1000, tzinfo=UTC)


def test_floor_to_bucket_is_epoch_aligned_and_millisecond_exact() -> None:
    assert floor_to_bucket(at(12, 0, 9, 999), B) == at(12, 0, 0)
    assert floor_to_bucket(at(12, 0, 10), B) == at(12, 0, 10)
    assert floor_to_bucket(at(12, 0, 10, 1), B) == at(12, 0, 10)


def test_frontier_excludes_buckets_not_yet_settled() -> None:
    settle = timedelta(seconds=30)
    # At 12:01:05 with a 30 s settle delay, buckets ending by 12:00:35 are settled:
    # the last settled one is [12:00:20, 12:00:30), so the frontier is 12:00:30.
    assert settled_frontier(at(12, 1, 5), settle, B) == at(12, 0, 30)
    assert settled_frontier(at(12, 1, 0), settle, B) == at(12, 0, 30)
    assert settled_frontier(at(12, 0, 59, 999), settle, B) == at(12, 0, 20)


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("5m", 300), ("1h", 3600), ("7d", 604800)]
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize(("text", "seconds"), [("9999999s", 9_999_999), ("3650d", 3650 * 86400)])
def test_parse_duration_upper_range(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "5",
        "0s",
        "-1m",
        "1.5h",
        "1y",
        "m5",
        "5m\n",  # `$` would match before the newline
        " 5m",
        "5m ",
        "5 m",
        "5M",
        "\u0665m",  # Arabic-Indic five
        "\u00b2m",  # superscript two: isdigit() but not int()
        "\uff15m",  # fullwidth five
        "05m",
        "5m5",
        "5mm",
        "3651d",  # past the ten-year bound
        "9999999d",  # year overflow in every datetime computation
        "9999999h",
        "99999999s",
    ],
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_window_must_be_whole_buckets() -> None:
    assert Window.parse("1m", B) == Window("1m", timedelta(minutes=1))
    with pytest.raises(ValueError, match="whole number"):
        Window.parse("15s", B)


def test_completion_rate() -> None:
    assert completion_rate(285, 300) == 0.95
    assert completion_rate(0, 300) == 0.0
    assert completion_rate(300, 300) == 1.0
    assert math.isnan(completion_rate(0, 0))
