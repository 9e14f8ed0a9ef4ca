"""Pub/Sub's push envelope, read strictly: what a push subscription POSTs to its endpoint.

    {"message": {"data": "<base64>", "attributes": {"k": "v"}, "messageId": "1",
                 "publishTime": "2026-12-08T10:00:00.123456789Z", "orderingKey": ""},
     "subscription": "projects/<project>/subscriptions/<id>", "deliveryAttempt": 1}

Pure: bytes in, a `PushedMessage` or an `EnvelopeError` (a 400 naming the field) out. Every
limit is Pub/Sub's own (100 attributes, keys of 256 bytes, values of 1,024, 10 MB of data), so
nothing Pub/Sub can push is refused and nothing larger is held.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from eventaudit.contract import PUBSUB_ID_PATTERN, is_pubsub_id
from eventaudit.http import echo

MAX_ATTRIBUTES = 128
"""Pub/Sub publishes at most 100; a dead letter carries two more of Pub/Sub's own."""
MAX_ATTRIBUTE_KEY_BYTES = 256
MAX_ATTRIBUTE_VALUE_BYTES = 1024
MAX_DATA_BYTES = 10_000_000
MAX_MESSAGE_ID_CHARS = 128
MAX_DELIVERY_ATTEMPT = 2**31 - 1
MAX_ENVELOPE_BYTES = 16 * 2**20
"""A 10 MB message is 13.4 MB of base64, plus attributes: a bigger body is no push."""
MAX_JSON_VALUES = 1 << 18
"""Opening brackets and commas a push can hold: base64 has none, and attributes hold at most
MAX_ATTRIBUTES * 1,280 bytes. More is refused before parsing: 16 MB of `[{},{},...]` would
cost about 400 MB to parse."""

_SUBSCRIPTION = re.compile(
    rf"projects/[a-z][a-z0-9\-.:]{{0,100}}/subscriptions/({PUBSUB_ID_PATTERN})", re.ASCII
)
_TIME = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:[0-5]\d)",
    re.ASCII,
)
_MESSAGE_ID = re.compile(rf"[!-~]{{1,{MAX_MESSAGE_ID_CHARS}}}", re.ASCII)


class EnvelopeError(ValueError):
    """The body is not a push envelope; the message says which field and why."""


@dataclass
class PushedMessage:
    """One pushed message (the fields the audited subscriber reads, as a pulled message has
    them, plus `data` for the handler)."""

    subscription: str
    """the subscription's id"""
    message_id: str
    publish_time: datetime
    """Pub/Sub's publish time (to the millisecond, UTC)"""
    data: bytes = b""
    attributes: dict[str, str] = field(default_factory=dict)
    delivery_attempt: int | None = None
    ordering_key: str = ""


def push_body(
    project: str,
    subscription: str,
    message_id: str,
    publish_time: datetime,
    data: bytes = b"",
    attributes: Mapping[str, str] | None = None,
) -> bytes:
    """The body Pub/Sub POSTs to a push endpoint for one message (its fields under both
    spellings, its publish time in nanoseconds, UTC): for tests and tools that play Pub/Sub.
    parse_envelope reads it back."""
    when = publish_time.astimezone(UTC)
    stamp = f"{when:%Y-%m-%dT%H:%M:%S}.{when.microsecond:06d}000Z"
    message = {
        "data": base64.b64encode(data).decode(),
        "attributes": dict(attributes or {}),
        "messageId": message_id,
        "message_id": message_id,
        "publishTime": stamp,
        "publish_time": stamp,
    }
    return json.dumps(
        {"message": message, "subscription": f"projects/{project}/subscriptions/{subscription}"}
    ).encode()


def _reject_constant(name: str) -> Any:
    raise EnvelopeError(f"not JSON: {name} is not a number")


def parse_envelope(body: bytes) -> PushedMessage:
    """The message of a push envelope; EnvelopeError when `body` is not one."""
    if len(body) > MAX_ENVELOPE_BYTES:
        raise EnvelopeError(f"body of {len(body)} bytes: a push envelope is at most "
                            f"{MAX_ENVELOPE_BYTES}")  # fmt: skip
    if body.count(b"{") + body.count(b"[") + body.count(b",") > MAX_JSON_VALUES:
        raise EnvelopeError("not a push envelope: far too many JSON values")
    try:
        doc = json.loads(body, parse_constant=_reject_constant)
    except ValueError as exc:  # not JSON, not UTF-8, an integer of over 4,300 digits
        raise EnvelopeError(f"not JSON: {exc}") from None
    except RecursionError:
        raise EnvelopeError("not JSON: nested too deep") from None
    if not isinstance(doc, dict):
        raise EnvelopeError("not a push envelope: a JSON object is expected")
    message = doc.get("message")
    if not isinstance(message, dict):
        raise EnvelopeError("`message` must be an object")
    subscription = _subscription(doc.get("subscription"))
    return PushedMessage(
        subscription=subscription,
        message_id=_message_id(_one(message, "messageId", "message_id")),
        publish_time=_publish_time(_one(message, "publishTime", "publish_time")),
        data=_data(message.get("data")),
        attributes=_attributes(message.get("attributes")),
        delivery_attempt=_delivery_attempt(doc.get("deliveryAttempt")),
        ordering_key=_ordering_key(message.get("orderingKey")),
    )


def _one(message: dict[str, Any], name: str, twin: str) -> object:
    """A field Pub/Sub sends under two spellings (the same value under both)."""
    if name in message and twin in message and message[name] != message[twin]:
        raise EnvelopeError(f"`message.{name}` and `message.{twin}` differ")
    return message.get(name, message.get(twin))


def _subscription(value: object) -> str:
    if not isinstance(value, str):
        raise EnvelopeError("`subscription` must be a string: projects/P/subscriptions/S")
    match = _SUBSCRIPTION.fullmatch(value)
    if match is None or not is_pubsub_id(match.group(1)):
        raise EnvelopeError(f"`subscription` {echo(value)} is not projects/P/subscriptions/S")
    return match.group(1)


def _message_id(value: object) -> str:
    if not isinstance(value, str) or not _MESSAGE_ID.fullmatch(value):
        shown = echo(value) if isinstance(value, str) else type(value).__name__
        raise EnvelopeError(
            f"`message.messageId` must be 1 to {MAX_MESSAGE_ID_CHARS} printable ASCII "
            f"characters, not {shown}"
        )
    return value


def _publish_time(value: object) -> datetime:
    """RFC 3339 with up to nanoseconds, kept to the millisecond (as pulled messages are)."""
    match = _TIME.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        shown = echo(value) if isinstance(value, str) else type(value).__name__
        raise EnvelopeError(f"`message.publishTime` must be an RFC 3339 time, not {shown}")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    try:
        moment = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second),
                          int((fraction or "0")[:3].ljust(3, "0")) * 1000, tzinfo=UTC)  # fmt: skip
        if zone not in "Zz":
            sign = 1 if zone[0] == "+" else -1
            offset = timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
            if offset >= timedelta(hours=24):
                raise ValueError("offset of a day or more")
            moment -= sign * offset
    except (ValueError, OverflowError) as exc:
        raise EnvelopeError(f"`message.publishTime` {echo(str(value))}: {exc}") from None
    return moment


def _data(value: object) -> bytes:
    if value is None:
        return b""  # a message without data (attributes only)
    if not isinstance(value, str):
        raise EnvelopeError("`message.data` must be a base64 string")
    try:
        data = base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise EnvelopeError("`message.data` is not base64") from None
    if len(data) > MAX_DATA_BYTES:
        raise EnvelopeError(f"`message.data` of {len(data)} bytes: Pub/Sub holds at most "
                            f"{MAX_DATA_BYTES}")  # fmt: skip
    return data


def _attributes(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise EnvelopeError("`message.attributes` must be an object of strings")
    if len(value) > MAX_ATTRIBUTES:
        raise EnvelopeError(f"{len(value)} attributes: Pub/Sub allows {MAX_ATTRIBUTES}")
    for key, item in value.items():
        if not isinstance(item, str):
            raise EnvelopeError(f"attribute {echo(key)} must be a string")
        try:
            key_bytes, item_bytes = len(key.encode()), len(item.encode())
        except UnicodeEncodeError:
            raise EnvelopeError(f"attribute {echo(key)} is not valid UTF-8") from None
        if not 0 < key_bytes <= MAX_ATTRIBUTE_KEY_BYTES:
            raise EnvelopeError(f"attribute key {echo(key)}: 1 to {MAX_ATTRIBUTE_KEY_BYTES} bytes")
        if item_bytes > MAX_ATTRIBUTE_VALUE_BYTES:
            raise EnvelopeError(
                f"attribute {echo(key)}: values are at most {MAX_ATTRIBUTE_VALUE_BYTES} bytes"
            )
    return value


def _delivery_attempt(value: object) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not 0 < value <= MAX_DELIVERY_ATTEMPT:
        raise EnvelopeError(
            f"`deliveryAttempt` must be an integer from 1 to {MAX_DELIVERY_ATTEMPT}"
        )
    return value


def _ordering_key(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value.encode(errors="replace")) > 1024:
        raise EnvelopeError("`message.orderingKey` must be a string of at most 1024 bytes")
    return value
