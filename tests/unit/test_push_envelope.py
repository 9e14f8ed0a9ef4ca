"""The push envelope is read strictly: what Pub/Sub pushes parses exactly; anything else is an
EnvelopeError naming the field (the receiver answers it 400, records nothing)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from eventaudit.push.envelope import MAX_ENVELOPE_BYTES, EnvelopeError, parse_envelope, push_body

SUB = "projects/eventaudit-local/subscriptions/create-user-push"


def envelope(**changes: Any) -> dict[str, Any]:
    """A push as Pub/Sub sends it (both spellings of the message fields, as it does)."""
    doc: dict[str, Any] = {
        "message": {
            "data": base64.b64encode(b'{"name": "Zakk"}').decode(),
            "attributes": {"eventID": "e1", "k": "v"},
            "messageId": "2070443601311540",
            "message_id": "2070443601311540",
            "publishTime": "2026-12-08T10:00:00.123456789Z",
            "publish_time": "2026-12-08T10:00:00.123456789Z",
        },
        "subscription": SUB,
        "deliveryAttempt": 3,
    }
    for key, value in changes.items():
        where, _, field = key.partition("__")
        target = doc["message"] if where == "m" else doc
        name = field or where
        if value is _DROP:
            target.pop(name, None)
            if where == "m":  # the snake_case twin too
                target.pop(_TWINS.get(name, name), None)
        else:
            target[name] = value
            twin = _TWINS.get(name)
            if where == "m" and twin is not None and f"m__{twin}" not in changes:
                target[twin] = value  # Pub/Sub sends both spellings alike
    return doc


_DROP = object()
_TWINS = {"messageId": "message_id", "publishTime": "publish_time"}
TEN = datetime(2026, 12, 8, 10, 0, tzinfo=UTC)
HALF = TEN.replace(microsecond=500_000)


def body(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def test_a_push_parses_exactly() -> None:
    pushed = parse_envelope(body(envelope()))
    assert (pushed.subscription, pushed.message_id, pushed.data, pushed.attributes) == (
        "create-user-push",
        "2070443601311540",
        b'{"name": "Zakk"}',
        {"eventID": "e1", "k": "v"},
    )
    assert pushed.publish_time == datetime(2026, 12, 8, 10, 0, 0, 123000, tzinfo=UTC)
    assert (pushed.delivery_attempt, pushed.ordering_key) == (3, "")


@pytest.mark.parametrize(
    ("changes", "time", "attempt", "data", "attributes"),
    [
        ({"m__publishTime": "2026-12-08T11:30:00+01:30"}, TEN, 3, None, None),
        ({"m__publishTime": "2026-12-08T10:00:00Z"}, TEN, 3, None, None),
        ({"m__publishTime": "2026-12-08T10:00:00.5Z"}, HALF, 3, None, None),
        ({"deliveryAttempt": _DROP}, None, None, None, None),  # no dead-letter policy
        ({"m__data": _DROP}, None, 3, b"", None),  # attributes only
        ({"m__data": ""}, None, 3, b"", None),
        ({"m__attributes": _DROP}, None, 3, None, {}),
        ({"m__publishTime": "2026-12-08t10:00:00z"}, TEN, 3, None, None),  # RFC 3339 allows
        ({"m__publishTime": "2026-12-08T10:00:00-00:00"}, TEN, 3, None, None),
        ({"extra": {"deep": [1, 2]}}, None, 3, None, None),  # fields Pub/Sub may add
    ],
)  # fmt: skip
def test_what_pub_sub_may_push_parses(
    changes: dict[str, Any],
    time: datetime | None,
    attempt: int | None,
    data: bytes | None,
    attributes: dict[str, str] | None,
) -> None:
    pushed = parse_envelope(body(envelope(**changes)))
    if time is not None:
        assert pushed.publish_time == time
    assert pushed.delivery_attempt == attempt
    if data is not None:
        assert pushed.data == data
    if attributes is not None:
        assert pushed.attributes == attributes


def test_a_push_with_only_the_snake_case_fields_parses() -> None:
    doc = envelope(m__messageId=_DROP, m__publishTime=_DROP)
    doc["message"].update(message_id="42", publish_time="2026-12-08T10:00:00Z")
    pushed = parse_envelope(body(doc))
    assert (pushed.message_id, pushed.publish_time) == ("42", TEN)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        # the body itself
        (b"", "not JSON"),
        (b"\xff\xfe{", "not JSON"),
        (b'{"message": NaN}', "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),  # nested too deep
        (b'{"deliveryAttempt": ' + b"9" * 5000 + b"}", "not JSON"),  # an integer past 4,300 digits
        (body([envelope()]), "JSON object"),
        (body("push"), "JSON object"),
        (b"{" + b" " * (MAX_ENVELOPE_BYTES) + b"}", "at most"),
        # message
        (body(envelope(message=_DROP)), "`message` must be an object"),
        (body(envelope(message="x")), "`message` must be an object"),
        # subscription (a forged or malformed one)
        (body(envelope(subscription=_DROP)), "`subscription` must be a string"),
        (body(envelope(subscription=7)), "`subscription` must be a string"),
        (body(envelope(subscription="create-user-push")), "is not projects/P/subscriptions/S"),
        (body(envelope(subscription=SUB + "\n")), "is not projects/P/subscriptions/S"),
        (body(envelope(subscription="projects/p/subscriptions/goog-sub")), "is not projects"),
        (body(envelope(subscription="projects/p/topics/create-user")), "is not projects"),
        (body(envelope(subscription="projects/p/subscriptions/a\u0661b")), "is not projects"),
        # messageId
        (body(envelope(m__messageId=_DROP)), "`message.messageId`"),
        (body(envelope(m__messageId=7)), "not int"),
        (body(envelope(m__messageId="")), "`message.messageId`"),
        (body(envelope(m__messageId="1\n")), "`message.messageId`"),
        (body(envelope(m__messageId="\u0661")), "`message.messageId`"),
        (body(envelope(m__messageId="1" * 129)), "`message.messageId`"),
        # publishTime
        (body(envelope(m__publishTime=_DROP)), "`message.publishTime`"),
        (body(envelope(m__publishTime=1765188000)), "not int"),
        (body(envelope(m__publishTime="2026-12-08 10:00:00Z")), "RFC 3339"),
        (body(envelope(m__publishTime="2026-12-08T10:00:00Z\n")), "RFC 3339"),  # trailing newline
        (body(envelope(m__publishTime="\uff12\uff10\uff12\uff16-12-08T10:00:00Z")), "RFC 3339"),
        (body(envelope(m__publishTime="2026-13-08T10:00:00Z")), "month must be in 1..12"),
        (body(envelope(m__publishTime="2026-12-08T10:00:00.1234567890Z")), "RFC 3339"),
        (body(envelope(m__publishTime="2026-12-08T10:00:00+24:00")), "offset of a day"),
        (body(envelope(m__publishTime="2026-12-08T10:00:00+00:99")), "RFC 3339"),
        (body(envelope(m__publishTime="2026-12-08T10:00:60Z")), "second must be in 0..59"),
        (body(envelope(m__publish_time="2026-12-08T10:00:01Z")), "differ"),  # twins disagree
        (body(envelope(m__message_id="2")), "differ"),
        (b'{"message": [' + b"{}," * 300_000 + b"{}]}", "far too many JSON values"),
        (b"[" + b"1.5," * 300_000 + b"1]", "far too many JSON values"),
        (body(envelope(m__publishTime="0001-01-01T00:00:00+01:00")), "publishTime"),  # overflow
        # data
        (body(envelope(m__data=5)), "`message.data` must be a base64 string"),
        (body(envelope(m__data="not base64!")), "is not base64"),
        (body(envelope(m__data="aGVsbG8=\n")), "is not base64"),
        (body(envelope(m__data="aGVsbG8")), "is not base64"),  # padding missing
        (body(envelope(m__data="\u00e9\u00e9\u00e9\u00e9")), "is not base64"),
        (body(envelope(m__data=base64.b64encode(b"x" * 10_000_001).decode())), "at most 10000000"),
        # attributes
        (body(envelope(m__attributes=["eventID"])), "object of strings"),
        (body(envelope(m__attributes={"eventID": 5})), "must be a string"),
        (body(envelope(m__attributes={"eventID": None})), "must be a string"),
        (body(envelope(m__attributes={f"k{i}": "v" for i in range(129)})), "129 attributes"),
        (body(envelope(m__attributes={"k" * 257: "v"})), "1 to 256 bytes"),
        (body(envelope(m__attributes={"": "v"})), "1 to 256 bytes"),
        (body(envelope(m__attributes={"k": "v" * 1025})), "at most 1024 bytes"),
        # deliveryAttempt
        (body(envelope(deliveryAttempt=0)), "`deliveryAttempt`"),
        (body(envelope(deliveryAttempt=-1)), "`deliveryAttempt`"),
        (body(envelope(deliveryAttempt=2**31)), "`deliveryAttempt`"),
        (body(envelope(deliveryAttempt=1.0)), "`deliveryAttempt`"),
        (body(envelope(deliveryAttempt=True)), "`deliveryAttempt`"),
        (body(envelope(deliveryAttempt="1")), "`deliveryAttempt`"),
        # orderingKey
        (body(envelope(m__orderingKey=5)), "`message.orderingKey`"),
        (body(envelope(m__orderingKey="k" * 1025)), "`message.orderingKey`"),
    ],
)  # fmt: skip
def test_what_is_not_a_push_is_refused_naming_the_field(raw: bytes, says: str) -> None:
    with pytest.raises(EnvelopeError, match=None) as caught:
        parse_envelope(raw)
    assert says in str(caught.value)
    assert len(str(caught.value)) < 300  # never the input whole


def test_a_lone_surrogate_attribute_key_is_refused() -> None:
    doc = envelope()
    raw = body(doc).replace(b'"k": "v"', b'"\\ud800": "v"')
    with pytest.raises(EnvelopeError, match="not valid UTF-8"):
        parse_envelope(raw)


def test_what_push_body_writes_parse_envelope_reads_back() -> None:
    when = datetime(2026, 12, 8, 10, 0, 0, 123456, tzinfo=UTC)
    raw = push_body("p-1", "orders-push", "42", when, b"\x00\xff", {"eventID": "e1"})
    pushed = parse_envelope(raw)
    assert (pushed.subscription, pushed.message_id, pushed.data, pushed.attributes) == (
        "orders-push", "42", b"\x00\xff", {"eventID": "e1"}
    )  # fmt: skip
    assert pushed.publish_time == when.replace(microsecond=123000)  # kept to the millisecond
