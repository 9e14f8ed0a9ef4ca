"""The audited message contract: attribute names, trace context and event identity."""

from __future__ import annotations

import json
import math
import re
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

EVENT_ID = "eventID"
PUBLISH_TIME = "publishTime"
CLOUD_TRACE_CONTEXT = "Cloud-Trace-Context"
TRACEPARENT = "traceparent"
OPTIONS = "Options"

# Every pattern here is used with fullmatch: `$` would also match before a trailing newline.
_CLOUD_TRACE = re.compile(r"([0-9a-fA-F]{32})(?:/([0-9]+))?(?:;o=([01]))?")
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_MAX_EVENT_ID_LEN = 128
EVENT_ID_PATTERN = r"[A-Za-z0-9._:\-]{1,128}"
_EVENT_ID = re.compile(EVENT_ID_PATTERN)
# Pub/Sub's rule for topic and subscription ids: a letter, then 2..254 of these characters.
PUBSUB_ID_PATTERN = r"[A-Za-z][A-Za-z0-9\-_.~+%]{2,254}"  # and not starting with goog
_PUBSUB_ID = re.compile(PUBSUB_ID_PATTERN)
_ASCII_DIGITS = re.compile(r"[0-9]+")
_MAX_SPAN_DIGITS = 20


def is_pubsub_id(text: str) -> bool:
    """True for a valid Pub/Sub topic or subscription id (never one starting with `goog`)."""
    return _PUBSUB_ID.fullmatch(text) is not None and not text.lower().startswith("goog")


def parse_ascii_int(text: str, max_digits: int = 18) -> int | None:
    """A non-negative integer written in ASCII digits only, else None.

    `str.isdigit()` and `int()` accept other scripts' digits (Arabic-Indic "10" is 10), and
    `isdigit()` accepts superscripts that `int()` rejects (`"²"`): no number a client sends.
    """
    if len(text) > max_digits or _ASCII_DIGITS.fullmatch(text) is None:
        return None
    return int(text)


class InvalidMessageError(ValueError):
    """A received message does not carry a usable audit contract."""


@dataclass(frozen=True, slots=True)
class TraceContext:
    """One trace, written both as Cloud-Trace-Context and as W3C traceparent."""

    trace_id: str
    span_id: int
    sampled: bool = True

    @classmethod
    def new(cls) -> TraceContext:
        """A fresh random trace with a random span."""
        return cls(secrets.token_hex(16), _random_span_id())

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> TraceContext | None:
        """Read `traceparent` first, else `X-Cloud-Trace-Context` or `Cloud-Trace-Context`.

        Header lookup is case-insensitive when `headers` is (Flask's and Pub/Sub's are not all).
        Malformed values are ignored rather than rejected: tracing must never fail a publish.
        """
        lowered = {k.lower(): v for k, v in headers.items()}
        parsed = parse_traceparent(lowered.get(TRACEPARENT, ""))
        if parsed is None:
            cloud = lowered.get("x-cloud-trace-context") or lowered.get(CLOUD_TRACE_CONTEXT.lower())
            parsed = parse_cloud_trace_context(cloud or "")
        return parsed

    def child(self) -> TraceContext:
        """The same trace with a new span: the publish is a child of the incoming request."""
        return TraceContext(self.trace_id, _random_span_id(), self.sampled)

    @property
    def cloud_trace_context(self) -> str:
        """`TRACE_ID/SPAN_ID;o=1` with a decimal span id, as Google Cloud expects."""
        return f"{self.trace_id}/{self.span_id};o={1 if self.sampled else 0}"

    @property
    def traceparent(self) -> str:
        """W3C `00-TRACE_ID-SPAN_ID-FLAGS` with a 16-hex span id."""
        return f"00-{self.trace_id}-{self.span_id:016x}-{'01' if self.sampled else '00'}"


def _random_span_id() -> int:
    # W3C forbids an all-zero span id; 63 bits keep the decimal form a signed int64 too.
    return secrets.randbits(63) or 1


def parse_cloud_trace_context(value: str) -> TraceContext | None:
    """Parse `TRACE_ID[/SPAN_ID][;o=0|1]`; None when malformed."""
    match = _CLOUD_TRACE.fullmatch(value.strip())
    if not match:
        return None
    trace_id = match.group(1).lower()
    if trace_id == "0" * 32:
        return None
    # Read at most 20 digits (2**64 has 20): a longer span is never converted (int() of
    # 4301+ digits raises), it is replaced like a zero or too large one.
    span_id = parse_ascii_int(match.group(2) or "", _MAX_SPAN_DIGITS) or 0
    if span_id == 0 or span_id >= 2**64:
        span_id = _random_span_id()
    return TraceContext(trace_id, span_id, match.group(3) != "0")


def parse_traceparent(value: str) -> TraceContext | None:
    """Parse a W3C `traceparent`; None when malformed or all-zero."""
    match = _TRACEPARENT.fullmatch(value.strip().lower())
    if not match or match.group(1) == "ff":
        return None
    trace_id, span_hex, flags = match.group(2), match.group(3), match.group(4)
    if trace_id == "0" * 32 or span_hex == "0" * 16:
        return None
    return TraceContext(trace_id, int(span_hex, 16), bool(int(flags, 16) & 1))


def new_event_id() -> str:
    """A fresh event id (UUID4)."""
    return str(uuid.uuid4())


def validate_event_id(event_id: object) -> str:
    """Return a usable event id or raise InvalidMessageError saying why."""
    if not isinstance(event_id, str) or not event_id:
        raise InvalidMessageError("missing eventID")
    if len(event_id) > _MAX_EVENT_ID_LEN or not _EVENT_ID.fullmatch(event_id):
        raise InvalidMessageError("malformed eventID")
    return event_id


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def epoch_ms(moment: datetime) -> int:
    """Epoch milliseconds of an aware datetime, in integer arithmetic (no float rounding:
    the attribute and the stored record must land in the same bucket)."""
    return (moment - _EPOCH) // _MS


def from_epoch_ms(value: int) -> datetime:
    """Aware UTC datetime from epoch milliseconds."""
    return _EPOCH + value * _MS


def utc_now_ms() -> datetime:
    """Now, truncated to the millisecond precision BSON dates keep."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def build_attributes(
    event_id: str, publish_time: datetime, trace: TraceContext, options: str = "{}"
) -> dict[str, str]:
    """The attributes every audited message carries."""
    return {
        EVENT_ID: event_id,
        PUBLISH_TIME: str(epoch_ms(publish_time)),
        CLOUD_TRACE_CONTEXT: trace.cloud_trace_context,
        TRACEPARENT: trace.traceparent,
        OPTIONS: options,
    }


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (math.inf, -math.inf):
        raise ValueError(f"{text} is not a finite number")
    return value


# JSON a caller sends is nested at most this deep. Python's parser stops near 1000 levels, but
# what reads the value afterwards (validation, error answers, json.dumps) recurses too, from
# deeper in the stack: 980 levels parsed, then failed with a RecursionError (a 500).
MAX_JSON_DEPTH = 100


class NestedTooDeeplyError(RecursionError):
    """JSON nested deeper than MAX_JSON_DEPTH (or than the parser can go)."""


def loads_finite_json(text: str | bytes) -> Any:
    """`json.loads` without Python's extensions: NaN, Infinity and numbers that overflow to
    infinity (`1e400`) are rejected with ValueError; nesting deeper than MAX_JSON_DEPTH
    raises NestedTooDeeplyError (a RecursionError)."""
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError as exc:
        raise NestedTooDeeplyError(f"nested deeper than {MAX_JSON_DEPTH} levels") from exc
    if _deeper_than(value, MAX_JSON_DEPTH):
        raise NestedTooDeeplyError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and objects in `value` nest more than `limit` levels (level by level:
    no recursion)."""
    level, depth = [value], 0
    while level:
        containers = [v for v in level if isinstance(v, dict | list)]
        if not containers:
            return False
        depth += 1
        if depth > limit:
            return True
        level = [c for v in containers for c in (v.values() if isinstance(v, dict) else v)]
    return False


# Options travels as a Pub/Sub attribute value, which holds at most 1024 bytes.
_MAX_OPTIONS_BYTES = 1024


def normalize_options(options: object) -> str:
    """Options travel as a JSON string; accept a mapping or a JSON string, reject anything else
    (NaN, infinities and more than 1024 bytes included), with the reason in a ValueError."""
    if options is None:
        return "{}"
    if not isinstance(options, str | dict):
        raise ValueError("Options must be a JSON object or a JSON string")
    try:
        if isinstance(options, str):
            loads_finite_json(options)
            text = options
        else:
            text = json.dumps(options, separators=(",", ":"), sort_keys=True, allow_nan=False)
        size = len(text.encode())
    except RecursionError as exc:
        raise ValueError("Options is nested too deeply") from exc
    except UnicodeEncodeError as exc:
        raise ValueError(f"Options is not encodable as UTF-8: {exc.reason}") from exc
    except ValueError as exc:
        if isinstance(options, dict):
            raise ValueError("Options numbers must be finite (no NaN or Infinity)") from exc
        raise ValueError(f"Options is not valid JSON: {exc}") from exc
    except TypeError as exc:
        raise ValueError(f"Options is not JSON: {exc}") from exc
    if size > _MAX_OPTIONS_BYTES:
        raise ValueError(f"Options is {size} bytes; an attribute holds at most 1024")
    return text


# The audit keeps an event's own attributes (those a subscription filter can refer to) in its
# publish record and journal entry, as compact JSON: at most this many bytes of it.
MAX_EVENT_ATTRIBUTES_BYTES = 1024
CONTRACT_ATTRIBUTES = frozenset({EVENT_ID, PUBLISH_TIME, CLOUD_TRACE_CONTEXT, TRACEPARENT, OPTIONS})
# Pub/Sub's limits on a message (cloud.google.com/pubsub/quotas, "Resource limits"): 100
# attributes, keys of 256 bytes, values of 1024, an ordering key of 1 KB, and a publish
# request of 10 MB (the client library's own check: 10,000,000 bytes of PublishRequest).
MAX_ATTRIBUTES = 100
MAX_ATTRIBUTE_KEY_BYTES = 256
MAX_ATTRIBUTE_VALUE_BYTES = 1024
MAX_ORDERING_KEY_BYTES = 1024
MAX_PUBLISH_REQUEST_BYTES = 10_000_000
MAX_OWN_ATTRIBUTES = MAX_ATTRIBUTES - len(CONTRACT_ATTRIBUTES)
# google-cloud-pubsub's PublisherClient.publish takes attributes as keyword arguments: these
# names are its own parameters, and cannot be sent as attributes through it.
_CLIENT_KEYWORDS = frozenset({"self", "topic", "data", "ordering_key", "retry", "timeout"})


def validate_event_attributes(attributes: object) -> dict[str, str]:
    """An event's own attributes, checked: a JSON object of strings (a JSON text or a mapping),
    at most MAX_OWN_ATTRIBUTES of them, none named like the audit's own or starting with
    `goog`, keys 1..256 bytes, values at most 1024, at most MAX_EVENT_ATTRIBUTES_BYTES as
    compact JSON (what the audit keeps to evaluate filters). ValueError says why."""
    if attributes is None:
        return {}
    if isinstance(attributes, str):
        try:
            attributes = loads_finite_json(attributes)
        except RecursionError as exc:
            raise ValueError("attributes are nested too deeply") from exc
        except ValueError as exc:
            raise ValueError(f"attributes are not valid JSON: {exc}") from exc
    if not isinstance(attributes, dict):
        raise ValueError("attributes must be a JSON object of string values")
    if len(attributes) > MAX_OWN_ATTRIBUTES:
        raise ValueError(
            f"an event has at most {MAX_OWN_ATTRIBUTES} attributes of its own, got "
            f"{len(attributes)} (Pub/Sub takes {MAX_ATTRIBUTES}; the audit sets "
            f"{len(CONTRACT_ATTRIBUTES)})"
        )
    checked: dict[str, str] = {}
    for key, value in attributes.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError("attribute keys and values must be strings")
        # Sizes first: the messages below quote the key.
        try:
            size, value_size = len(key.encode()), len(value.encode())
        except UnicodeEncodeError as exc:
            raise ValueError("an attribute key or value is not encodable as UTF-8") from exc
        if not 1 <= size <= MAX_ATTRIBUTE_KEY_BYTES:
            raise ValueError(f"attribute keys are 1 to {MAX_ATTRIBUTE_KEY_BYTES} bytes")
        if value_size > MAX_ATTRIBUTE_VALUE_BYTES:
            raise ValueError(
                f"attribute {key!r} is {value_size} bytes; Pub/Sub takes at most "
                f"{MAX_ATTRIBUTE_VALUE_BYTES} a value"
            )
        if key in CONTRACT_ATTRIBUTES:
            raise ValueError(f"attribute {key!r} is set by the audit")
        if key in _CLIENT_KEYWORDS:
            raise ValueError(
                f"attribute {key!r} cannot be sent: the Pub/Sub client takes it as a parameter"
            )
        if key.lower().startswith("goog"):
            raise ValueError(f"attribute {key!r}: Pub/Sub reserves keys starting with goog")
        checked[key] = value
    encoded = json.dumps(checked, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    if len(encoded.encode()) > MAX_EVENT_ATTRIBUTES_BYTES:
        raise ValueError(
            f"attributes take {len(encoded.encode())} bytes as JSON; the audit keeps at most "
            f"{MAX_EVENT_ATTRIBUTES_BYTES}"
        )
    return checked


def encode_attributes(attributes: Mapping[str, str]) -> str:
    """Attributes as kept in records and the journal: compact JSON with sorted keys ("" when
    there are none, the common case)."""
    if not attributes:
        return ""
    return json.dumps(dict(attributes), separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def decode_attributes(encoded: str) -> dict[str, str]:
    """Inverse of encode_attributes; ValueError when `encoded` is not what it writes."""
    if not encoded:
        return {}
    try:
        value = json.loads(encoded)
    except RecursionError as exc:
        raise ValueError("attributes are nested too deeply") from exc
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError("attributes must be a JSON object of strings")
    return value


# How far a publishTime attribute may be from the broker's publish time and still be trusted.
# The attribute is stamped when the event is handed to the client library, which batches and
# retries a publish for up to 10 minutes; clocks of healthy hosts agree within seconds. An hour
# leaves room for both; beyond it the attribute is a broken clock or a forged value, and the
# broker's time stands in, so every stored publishTime is within an hour of a real one (and
# retention, which goes by publishTime, reaches every receipt).
PUBLISH_TIME_TOLERANCE = timedelta(hours=1)
DEAD_LETTER_MAX_AGE = timedelta(days=7)
"""How long after its publish a message can be dead-lettered: Pub/Sub keeps an unacked message
on a subscription at most 7 days (its longest message retention)."""
_PUBLISH_TIME_DIGITS = 15

# Why the broker's publish time stood in for the publishTime attribute.
PUBLISH_TIME_FALLBACKS = ("missing", "malformed", "far")


@dataclass(frozen=True, slots=True)
class AuditedAttributes:
    """What a subscriber reads back from a received message's attributes."""

    event_id: str
    publish_time: datetime
    trace_id: str | None
    publish_time_fallback: str | None = None  # one of PUBLISH_TIME_FALLBACKS, or None


def read_attributes(
    attributes: Mapping[str, str],
    broker_time: datetime,
    tolerance: timedelta = PUBLISH_TIME_TOLERANCE,
    older: timedelta = timedelta(0),
) -> AuditedAttributes:
    """Parse a received message's attributes; raise InvalidMessageError when eventID is unusable.

    A publishTime that is missing, not ASCII digits, or further than `tolerance` from
    `broker_time` (Pub/Sub's own publish time) is replaced by `broker_time`, and
    `publish_time_fallback` says why: the event itself is still identifiable. `older` widens
    the tolerance backwards: a dead letter's broker time is when Pub/Sub forwarded it, up to
    DEAD_LETTER_MAX_AGE after the event was published.
    """
    # Attributes are strings on the wire; anything else (a library caller's mistake) is ignored.
    text = {k: v for k, v in attributes.items() if isinstance(k, str) and isinstance(v, str)}
    event_id = validate_event_id(attributes.get(EVENT_ID))
    publish_time, fallback = _publish_time(
        attributes.get(PUBLISH_TIME), broker_time, tolerance, older
    )
    trace = TraceContext.from_headers(text)
    return AuditedAttributes(event_id, publish_time, trace.trace_id if trace else None, fallback)


def _publish_time(
    raw: object, broker_time: datetime, tolerance: timedelta, older: timedelta
) -> tuple[datetime, str | None]:
    if raw is None:
        return broker_time, "missing"
    value = parse_ascii_int(raw, _PUBLISH_TIME_DIGITS) if isinstance(raw, str) else None
    if value is None:
        return broker_time, "malformed"
    # Compared as integers first: a far value (year 10000 and on) never becomes a datetime.
    ahead = value - epoch_ms(broker_time)
    if ahead > tolerance // _MS or -ahead > (tolerance + older) // _MS:
        return broker_time, "far"
    return from_epoch_ms(value), None


# -- receipts relayed over Pub/Sub by consumers in other languages (docs/receipts.md) -------

RELAY_SUBSCRIPTION = "ea.subscription"
RELAY_TOPIC = "ea.topic"
RELAY_MESSAGE_ID = "ea.messageId"
RELAY_PUBLISH_TIME = "ea.publishTime"
RELAY_RECEIVE_TIME = "ea.receiveTime"
RELAY_DELIVERY_ATTEMPT = "ea.deliveryAttempt"
_RELAY_MESSAGE_ID = re.compile(r"[!-~]{1,128}")
_EARLIEST_MS = 946_684_800_000  # 2000-01-01
_LATEST_MS = 4_102_444_800_000  # 2100-01-01


@dataclass(frozen=True)
class RelayedDelivery:
    """What a receipt message says about one delivery: which subscription received which
    message (the event's own attributes travel beside these), and when."""

    subscription: str
    topic: str
    message_id: str
    broker_publish_time: datetime
    receive_time: datetime | None = None
    delivery_attempt: int | None = None


def parse_relayed(attributes: Mapping[str, str]) -> RelayedDelivery:
    """The `ea.*` attributes of a receipt message; InvalidMessageError naming the first that is
    missing or malformed."""

    def required(name: str) -> str:
        value = attributes.get(name)
        if not isinstance(value, str) or not value:
            raise InvalidMessageError(f"receipt message without {name}")
        return value

    def millis(name: str, value: str) -> datetime:
        ms = parse_ascii_int(value, 13)
        if ms is None or not _EARLIEST_MS <= ms < _LATEST_MS:
            raise InvalidMessageError(f"{name} is not milliseconds since 1970 in ASCII digits")
        return from_epoch_ms(ms)

    subscription, topic = required(RELAY_SUBSCRIPTION), required(RELAY_TOPIC)
    for name, value in ((RELAY_SUBSCRIPTION, subscription), (RELAY_TOPIC, topic)):
        if not is_pubsub_id(value):
            raise InvalidMessageError(f"{name} is not a Pub/Sub id")
    message_id = required(RELAY_MESSAGE_ID)
    if not _RELAY_MESSAGE_ID.fullmatch(message_id):
        raise InvalidMessageError(f"{RELAY_MESSAGE_ID} is not 1 to 128 printable ASCII characters")
    broker = millis(RELAY_PUBLISH_TIME, required(RELAY_PUBLISH_TIME))
    received = attributes.get(RELAY_RECEIVE_TIME)
    receive_time = millis(RELAY_RECEIVE_TIME, received) if received is not None else None
    raw_attempt = attributes.get(RELAY_DELIVERY_ATTEMPT)
    attempt = None
    if raw_attempt is not None:
        attempt = parse_ascii_int(raw_attempt, 10)
        if attempt is None or not 0 <= attempt < 2**31:
            raise InvalidMessageError(f"{RELAY_DELIVERY_ATTEMPT} is not a count")
        attempt = attempt or None  # 0: no dead-letter policy (Node's client says so)
    return RelayedDelivery(subscription, topic, message_id, broker, receive_time, attempt)
