"""`eventaudit-exporter lookup EVENT_ID`: one event's story from a running exporter.

Its arguments and whatever answers at --exporter are input like any other: a malformed id,
publish time or URL is refused before anything is asked; only the API's documented answer is
printed; credentials in --exporter are sent (HTTP basic) but never printed; every character
a terminal would act on (ESC, other controls, bidi overrides) is printed as its escape.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, TextIO

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from eventaudit.contract import (
    InvalidMessageError,
    epoch_ms,
    loads_finite_json,
    validate_event_id,
)
from eventaudit.exporter.story import VERDICTS, parse_publish_time, story_link

DEFAULT_EXPORTER = "http://127.0.0.1:9800"
# Exit codes: the story; no publish record of the event; no story (a malformed argument, or
# no usable answer from the exporter).
FOUND, UNKNOWN, FAILED = 0, 1, 2
MAX_ANSWER_BYTES = 16 * 2**20
TIMEOUT_SECONDS = 30.0
_BAD_EXPORTER = (
    "--exporter must be an http:// or https:// URL like http://127.0.0.1:9800 (printable "
    "ASCII, no query or fragment)"
)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, populate_by_name=True)


class _DeadLetter(_Strict):
    delivery_attempts: int | None = Field(None, alias="deliveryAttempts")


class _Subscription(_Strict):
    subscription: str
    verdict: str
    reason: str
    received: bool
    deliveries: int
    first_receive_time: str | None = Field(None, alias="firstReceiveTime")
    delivery_latency_seconds: float | None = Field(None, alias="deliveryLatencySeconds")
    dead_lettered: _DeadLetter | None = Field(None, alias="deadLettered")

    @field_validator("verdict")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in VERDICTS:
            raise ValueError("not a verdict")
        return value


class _Trace(_Strict):
    trace_id: str = Field(alias="traceID")


class _Published(_Strict):
    topic: str
    publish_time: str = Field(alias="publishTime")
    message_id: str | None = Field(alias="messageId")
    options: str
    trace: _Trace
    subscriptions: list[_Subscription]


class _Story(_Strict):
    """The answer of GET /api/v1/events/<eventID> (what this command reads of it)."""

    event_id: str = Field(alias="eventID")
    published: list[_Published] = Field(min_length=1)


def printable(text: str) -> str:
    """`text` with each character a terminal would act on written as its escape (`\\x1b`)."""
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


def render(story: dict[str, Any]) -> str:
    """The story as lines an on-call engineer reads (control characters escaped)."""
    lines = [f"event {story['eventID']}"]
    for published in story["published"]:
        trace = published["trace"]
        lines.append(
            f"  published to {published['topic']} at {published['publishTime']} "
            f"(message {published['messageId']}, trace {trace['traceID']}, "
            f"Options {published['options']})"
        )
        for sub in published["subscriptions"]:
            detail = ""
            if sub["received"]:
                latency = sub.get("deliveryLatencySeconds")
                after = f" ({latency:.3f} s after publish)" if isinstance(latency, float) else ""
                detail = (
                    f", {sub['deliveries']} deliveries, first at {sub['firstReceiveTime']}{after}"
                )
            if sub["deadLettered"]:
                detail += (
                    f", dead-lettered after {sub['deadLettered']['deliveryAttempts']} attempts"
                )
            lines.append(f"    {sub['subscription']}: {sub['verdict']}{detail}: {sub['reason']}")
    return "\n".join(printable(line) for line in lines)


def exporter_base(url: str) -> tuple[str, dict[str, str]]:
    """The exporter's base URL without credentials (what may be shown) and the headers that
    carry them; ValueError (quoting nothing of `url`) when it is not an http(s) URL."""
    if not url.isascii() or not url.isprintable() or " " in url:
        raise ValueError(_BAD_EXPORTER)
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(_BAD_EXPORTER) from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(_BAD_EXPORTER)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    netloc = host if port is None else f"{host}:{port}"
    base = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    headers = {"Accept": "application/json"}
    if parts.username is not None or parts.password is not None:
        user = urllib.parse.unquote(parts.username or "")
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        headers["Authorization"] = f"Basic {token}"
    return base, headers


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """The API never redirects: a redirect is an answer from something else (and would carry
    the credentials elsewhere)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def _get(url: str, headers: dict[str, str]) -> tuple[int, str, bytes]:
    """(status, reason, at most MAX_ANSWER_BYTES + 1 bytes of body); error statuses are
    answers too. Raises OSError (URLError included) or HTTPException when nothing answered."""
    request = urllib.request.Request(url, headers=headers)
    try:
        with _OPENER.open(request, timeout=TIMEOUT_SECONDS) as resp:
            return resp.status, str(resp.reason), resp.read(MAX_ANSWER_BYTES + 1)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, str(exc.reason), exc.read(MAX_ANSWER_BYTES + 1)


def _fail(err: TextIO, message: str, code: int = FAILED) -> int:
    print(f"lookup: {printable(message)}", file=err)
    return code


def main(argv: list[str], out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """0 when the story is printed, 1 when the exporter knows no such event, 2 otherwise."""
    parser = argparse.ArgumentParser(
        prog="eventaudit-exporter lookup",
        description="Where did one event go? Asks a running exporter (GET /api/v1/events/ID).",
    )
    parser.add_argument("event_id", help="the eventID")
    parser.add_argument(
        "--exporter",
        default=os.environ.get("EVENTAUDIT_EXPORTER_URL", DEFAULT_EXPORTER),
        help=f"the exporter's base URL (EVENTAUDIT_EXPORTER_URL; default {DEFAULT_EXPORTER})",
    )
    parser.add_argument("--publish-time", help="epoch ms of its publish time (any hour)")
    parser.add_argument("--json", action="store_true", help="print the JSON answer")
    args = parser.parse_args(argv)
    try:
        validate_event_id(args.event_id)
    except InvalidMessageError as exc:
        return _fail(err, f"{exc} (1 to 128 of A-Z a-z 0-9 . _ : -)")
    publish_ms = None
    if args.publish_time is not None:
        publish_time = parse_publish_time(args.publish_time)
        if publish_time is None:
            return _fail(err, "--publish-time must be epoch milliseconds (ASCII digits)")
        publish_ms = epoch_ms(publish_time)
    try:
        base, headers = exporter_base(args.exporter)
    except ValueError as exc:
        return _fail(err, str(exc))
    try:
        status, reason, body = _get(base + story_link(args.event_id, publish_ms), headers)
    except (OSError, http.client.HTTPException) as exc:
        why = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return _fail(
            err, f"no usable answer from the exporter at {base}: {type(exc).__name__}: {why}"
        )
    if len(body) > MAX_ANSWER_BYTES:
        return _fail(err, f"the answer from {base} is larger than 16 MiB: not an event story")
    try:
        answer = loads_finite_json(body)
    except (ValueError, RecursionError) as exc:
        if status != 200:
            return _fail(err, f"{status}: {reason}")
        return _fail(err, f"no usable answer from the exporter at {base}: {exc}")
    if status != 200:
        error = answer.get("error") if isinstance(answer, dict) else None
        _fail(err, f"{status}: {error if isinstance(error, str) else reason}")
        # 1 only for "no such event" (not a 404 from something without the route).
        known = status == 404 and isinstance(error, str) and "searched" in answer
        return UNKNOWN if known else FAILED
    try:
        story = _Story.model_validate(answer)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        return _fail(err, f"not an event story ({where}: {first['msg']})")
    if story.event_id != args.event_id:
        return _fail(err, f"the answer is the story of {story.event_id}, not {args.event_id}")
    print(json.dumps(answer, indent=2) if args.json else render(answer), file=out)
    return FOUND
