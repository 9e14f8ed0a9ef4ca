"""Trace context and attribute parsing."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from eventaudit.contract import (
    PUBLISH_TIME_TOLERANCE,
    InvalidMessageError,
    NestedTooDeeplyError,
    TraceContext,
    build_attributes,
    epoch_ms,
    from_epoch_ms,
    is_pubsub_id,
    loads_finite_json,
    normalize_options,
    parse_ascii_int,
    parse_cloud_trace_context,
    parse_traceparent,
    read_attributes,
    validate_event_attributes,
    validate_event_id,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def test_traceparent_round_trip() -> None:
    ctx = parse_traceparent(f"00-{TRACE}-00f067aa0ba902b7-01")
    assert ctx == TraceContext(TRACE, 0x00F067AA0BA902B7, True)
    assert ctx.traceparent == f"00-{TRACE}-00f067aa0ba902b7-01"
    assert ctx.cloud_trace_context == f"{TRACE}/{0x00F067AA0BA902B7};o=1"


def test_cloud_trace_context_forms() -> None:
    assert parse_cloud_trace_context(f"{TRACE}/123;o=1") == TraceContext(TRACE, 123, True)
    assert parse_cloud_trace_context(f"{TRACE.upper()}/123;o=0") == TraceContext(TRACE, 123, False)
    bare = parse_cloud_trace_context(TRACE)
    assert bare is not None and bare.trace_id == TRACE and bare.span_id > 0 and bare.sampled


@pytest.mark.parametrize(
    "value",
    [
        "",
        "xyz",
        "0" * 32 + "/1;o=1",
        f"{TRACE}/abc",
        f"{TRACE}/1;o=2",
        TRACE + "0",
        f"{TRACE}/-1",
        f"{TRACE}/+1",
        f"{TRACE}/1_0",
        f"{TRACE}/\u0661\u0660",  # Arabic-Indic 10: int() would read it
        f"{TRACE}/\u00b2",  # superscript two: isdigit() but not int()
        f"{TRACE}/\uff11",  # fullwidth 1
        f"{TRACE}/1;o=\u0661",
        f"{TRACE}/1;o=11",
        f"{TRACE}/{'1' * 5000}x",
        "\uff14" + TRACE[1:] + "/1",  # a fullwidth hex digit in the trace id
    ],
)
def test_bad_cloud_trace_context_is_ignored(value: str) -> None:
    assert parse_cloud_trace_context(value) is None


@pytest.mark.parametrize(
    ("span", "kept"),
    [
        ("1", True),
        ("18446744073709551615", True),  # 2**64 - 1: the largest span id there is
        ("18446744073709551616", False),  # 2**64
        ("99999999999999999999", False),  # 20 digits, over 2**64
        ("1" * 21, False),
        ("1" * 4300, False),  # int()'s default digit limit
        ("1" * 5000, False),  # over it: int() raises ValueError
        ("0", False),
        ("0" * 5000, False),
        ("0" * 19 + "7", True),  # 20 digits with leading zeros: 7
        ("0" * 20 + "7", False),  # 21 digits are never read, whatever their value
    ],
)
def test_an_unusable_cloud_trace_span_gets_a_fresh_one(span: str, kept: bool) -> None:
    # Tracing never fails a publish: a span id that is zero, too large or absurdly long keeps
    # the trace and gets a random span, without converting the digits.
    parsed = parse_cloud_trace_context(f"{TRACE}/{span};o=1")
    assert parsed is not None and parsed.trace_id == TRACE and parsed.sampled
    assert 0 < parsed.span_id < 2**64
    assert (str(parsed.span_id) == span.lstrip("0")) is kept
    assert len(parsed.traceparent) == 55
    headers = {"X-Cloud-Trace-Context": f"{TRACE}/{span};o=0"}
    from_headers = TraceContext.from_headers(headers)
    assert from_headers is not None and from_headers.trace_id == TRACE
    assert not from_headers.sampled


@pytest.mark.parametrize(
    "value",
    [
        "",
        f"ff-{TRACE}-00f067aa0ba902b7-01",
        f"00-{'0' * 32}-00f067aa0ba902b7-01",
        f"00-{TRACE}-{'0' * 16}-01",
        f"00-{TRACE}-00f067aa0ba902b7",
        f"00-{TRACE}-00f067aa0ba902b7-\u0661\u0661",
        f"00-{TRACE}-00f067aa0ba902b7-0g",
        f"00-{TRACE}-00f067aa0ba902b7-001",
        f"00-{TRACE}-00f067aa0ba902b7-01-" + "1" * 5000,
        f"\u0660\u0660-{TRACE}-00f067aa0ba902b7-01",
        f"00-{TRACE}-\uff10{'0' * 14}1-01",  # a fullwidth zero in the span
        f"00-{TRACE}-00f067aa0ba902b7-01\n00",
    ],
)
def test_bad_traceparent_is_ignored(value: str) -> None:
    assert parse_traceparent(value) is None


def test_headers_prefer_traceparent_then_cloud_header() -> None:
    other = "a" * 32
    both = {"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01", "X-Cloud-Trace-Context": f"{other}/1"}
    parsed = TraceContext.from_headers(both)
    assert parsed is not None and parsed.trace_id == TRACE
    assert TraceContext.from_headers({"x-cloud-trace-context": f"{other}/1;o=1"}) == TraceContext(
        other, 1, True
    )
    assert TraceContext.from_headers({"traceparent": "garbage"}) is None


def test_child_keeps_trace_and_changes_span() -> None:
    parent = TraceContext(TRACE, 7)
    child = parent.child()
    assert child.trace_id == TRACE and child.span_id != 7 and child.sampled


def test_attributes_carry_both_trace_forms_and_read_back() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    attrs = build_attributes("evt-1", when, TraceContext(TRACE, 42), '{"a":1}')
    assert attrs == {
        "eventID": "evt-1",
        "publishTime": "1767323045678",
        "Cloud-Trace-Context": f"{TRACE}/42;o=1",
        "traceparent": f"00-{TRACE}-000000000000002a-01",
        "Options": '{"a":1}',
    }
    parsed = read_attributes(attrs, when + timedelta(milliseconds=40))
    assert (parsed.event_id, parsed.publish_time, parsed.trace_id) == ("evt-1", when, TRACE)
    assert parsed.publish_time_fallback is None


def test_read_attributes_falls_back_to_broker_time_on_bad_publish_time() -> None:
    broker = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    parsed = read_attributes({"eventID": "e-1", "publishTime": "yesterday"}, broker)
    assert (parsed.publish_time, parsed.publish_time_fallback) == (broker, "malformed")
    assert parsed.trace_id is None
    parsed = read_attributes({"eventID": "e-1"}, broker)
    assert (parsed.publish_time, parsed.publish_time_fallback) == (broker, "missing")


@pytest.mark.parametrize(
    ("offset_ms", "usable"),
    [
        (0, True),
        (-PUBLISH_TIME_TOLERANCE // timedelta(milliseconds=1), True),
        (PUBLISH_TIME_TOLERANCE // timedelta(milliseconds=1), True),
        (-PUBLISH_TIME_TOLERANCE // timedelta(milliseconds=1) - 1, False),
        (PUBLISH_TIME_TOLERANCE // timedelta(milliseconds=1) + 1, False),
        (-epoch_ms(datetime(2026, 1, 2, tzinfo=UTC)), False),
        (253402300800000, False),
    ],
)
def test_publish_time_tolerance_boundary(offset_ms: int, usable: bool) -> None:
    broker = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    value = epoch_ms(broker) + offset_ms
    parsed = read_attributes({"eventID": "e-1", "publishTime": str(value)}, broker)
    if usable:
        assert parsed.publish_time == from_epoch_ms(value)
        assert parsed.publish_time_fallback is None
    else:
        assert (parsed.publish_time, parsed.publish_time_fallback) == (broker, "far")


def test_publish_time_tolerance_is_at_least_an_hour_and_configurable() -> None:
    assert timedelta(hours=1) <= PUBLISH_TIME_TOLERANCE
    broker = datetime(2026, 1, 2, tzinfo=UTC)
    late = str(epoch_ms(broker) + 2_000)
    assert (
        read_attributes({"eventID": "e", "publishTime": late}, broker).publish_time_fallback is None
    )
    tight = read_attributes({"eventID": "e", "publishTime": late}, broker, timedelta(seconds=1))
    assert tight.publish_time_fallback == "far"


@pytest.mark.parametrize(
    "value",
    [None, "", 5, "has space", "x" * 129, '{"$gt": ""}', "x\n", "x\r\n", "\nx", "x\u0660", "é"],
)
def test_invalid_event_ids(value: object) -> None:
    with pytest.raises(InvalidMessageError):
        validate_event_id(value)


def test_options_normalisation() -> None:
    assert normalize_options(None) == "{}"
    assert normalize_options({"b": 1, "a": 2}) == '{"a":2,"b":1}'
    assert normalize_options('{"x": 1}') == '{"x": 1}'
    with pytest.raises(ValueError):
        normalize_options("{oops")
    with pytest.raises(ValueError):
        normalize_options(3)


def test_epoch_ms_round_trip_is_exact() -> None:
    base = datetime(2026, 11, 27, tzinfo=UTC)
    for step in range(0, 50_000, 7):
        moment = base + timedelta(milliseconds=step)
        assert from_epoch_ms(epoch_ms(moment)) == moment
    assert epoch_ms(datetime(1970, 1, 1, 0, 0, 0, 1000, tzinfo=UTC)) == 1
    assert epoch_ms(datetime(2026, 1, 2, 3, 4, 5, 678999, tzinfo=UTC)) == 1767323045678


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("create-user", True),
        ("a.b~c+d%e_f-g", True),
        ("A" + "b" * 254, True),
        ("A" + "b" * 255, False),
        ("ab", False),
        ("1abc", False),
        ("create-user\n", False),
        ("create-user\r", False),
        ("\ncreate-user", False),
        ("goog-topic", False),
        ("GOOGle", False),
        ("top ic", False),
        ("t\u00e9st", False),
        ("topic/x", False),
        ("$where", False),
    ],
)
def test_pubsub_ids_are_matched_whole(text: str, valid: bool) -> None:
    assert is_pubsub_id(text) is valid


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("10", 10),
        ("007", 7),
        ("9" * 18, 10**18 - 1),
        ("9" * 19, None),
        ("", None),
        ("-1", None),
        ("+1", None),
        ("1.0", None),
        (" 1", None),
        ("1\n", None),
        ("\u00b2", None),  # superscript two: isdigit() but not int()
        ("\u0661\u0660", None),  # Arabic-Indic 10: int() accepts it
        ("\uff11", None),  # fullwidth 1
        ("1_000", None),  # int() accepts underscores
    ],
)
def test_parse_ascii_int_accepts_ascii_digits_only(text: str, value: int | None) -> None:
    assert parse_ascii_int(text) == value


@pytest.mark.parametrize(
    ("text", "depth_ok"),
    [
        ("[" * 100 + "]" * 100, True),
        ('{"a":' * 99 + "[]" + "}" * 99, True),
        ("[" * 101 + "]" * 101, False),
        ('{"a":' * 100 + "[]" + "}" * 100, False),
        ("[" * 980 + "]" * 980, False),  # parsed, then recursed elsewhere (a 500)
        ("[" * 5000 + "]" * 5000, False),  # the parser's own RecursionError
        ("[" + "[]," * 5000 + "[]]", True),  # wide, not deep
    ],
)
def test_json_is_nested_at_most_100_levels(text: str, depth_ok: bool) -> None:
    if depth_ok:
        assert loads_finite_json(text) is not None
    else:
        with pytest.raises(NestedTooDeeplyError, match="nested deeper than 100 levels"):
            loads_finite_json(text)


@pytest.mark.parametrize(
    ("attributes", "reason"),
    [
        ({f"k{i}": "" for i in range(95)}, None),
        ({f"k{i}": "" for i in range(96)}, "at most 95 attributes of its own, got 96"),
        ({"k" * 256: "v"}, None),
        ({"k" * 257: "v"}, "keys are 1 to 256 bytes"),
        ({"é" * 129: "v"}, "keys are 1 to 256 bytes"),
        ({"goog" + "k" * 5000: "v"}, "keys are 1 to 256 bytes"),  # quoted whole before
        ({"k": "v" * 1000}, None),
        ({"k": "é" * 513}, "'k' is 1026 bytes; Pub/Sub takes at most 1024 a value"),
        ({"k": "v" * 600, "l": "v" * 600}, "the audit keeps at most 1024"),
        ({"k": "\ud800"}, "not encodable as UTF-8"),
    ],
)
def test_own_attributes_within_pubsubs_limits(
    attributes: dict[str, str], reason: str | None
) -> None:
    if reason is None:
        assert validate_event_attributes(attributes) == attributes
    else:
        with pytest.raises(ValueError, match=re.escape(reason)):
            validate_event_attributes(attributes)
