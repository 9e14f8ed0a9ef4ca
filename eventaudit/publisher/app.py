"""The publisher's Flask API: the old `create-user` demo and a generic audited publish route."""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from google.api_core import exceptions as gexc
from google.cloud.pubsub_v1.publisher.exceptions import MessageTooLargeError
from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from eventaudit.contract import (
    CLOUD_TRACE_CONTEXT,
    EVENT_ID,
    MAX_JSON_DEPTH,
    OPTIONS,
    InvalidMessageError,
    TraceContext,
    is_pubsub_id,
    loads_finite_json,
)
from eventaudit.http import echo, json_error, metrics_view, register_json_errors
from eventaudit.publisher.audited import (
    PUBLISH_TIMEOUTS,
    AuditedPublisher,
    InvalidAttributesError,
    InvalidEventError,
    InvalidOptionsError,
    InvalidOrderingKeyError,
    PublishedEvent,
    RecordBuffer,
    TopicNotFoundError,
    TopicUnverifiedError,
)
from eventaudit.publisher.config import PublisherSettings

log = logging.getLogger(__name__)

BUSY_RETRY_AFTER_SECONDS = 1
_NAMES = ("Zakk Wylde", "Ada Lovelace", "Grace Hopper", "Alan Turing", "Edsger Dijkstra")


@dataclass(frozen=True)
class PublisherDeps:
    """What the API needs, built by `__main__` (or a test)."""

    publisher: AuditedPublisher
    buffer: RecordBuffer
    registry: CollectorRegistry


class UserOverrides(BaseModel):
    """Optional body of POST /api/v1/users: fields that replace the generated ones."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str | None = Field(None, min_length=1, max_length=200)
    age: int | None = Field(None, ge=0, le=150)
    gender: str | None = Field(None, min_length=1, max_length=50)


bp = Blueprint("publisher", __name__)


def _deps() -> PublisherDeps:
    deps: PublisherDeps = current_app.config["DEPS"]
    return deps


def _settings() -> PublisherSettings:
    settings: PublisherSettings = current_app.config["SETTINGS"]
    return settings


def _json_body(required: bool) -> dict[str, Any] | tuple[Response, int]:
    raw = request.get_data(cache=False)
    if not raw.strip():
        return json_error(400, "request body must be a JSON object") if required else {}
    try:
        # NaN, Infinity and 1e400 (infinity once parsed) are not JSON: no JSON consumer reads them.
        body = loads_finite_json(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return json_error(400, f"malformed JSON: {_clip(str(exc))}")
    except RecursionError:
        return json_error(400, f"JSON nested too deeply (at most {MAX_JSON_DEPTH} levels)")
    if not isinstance(body, dict):
        return json_error(400, f"payload must be a JSON object, got {type(body).__name__}")
    return body


def _clip(text: str, limit: int = 200) -> str:
    # A parser's message may quote the input (a 5000-digit number): never all of it.
    return text if len(text) <= limit else f"{text[:limit]}..."


class HeaderNotUTF8Error(ValueError):
    """A header whose bytes are not UTF-8."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"{name}: not UTF-8 (send UTF-8, or ASCII with JSON \\u escapes in JSON headers)"
        )


def _header(name: str) -> str | None:
    """A header's text. WSGI hands header bytes over one Latin-1 character each (PEP 3333):
    they are read as the UTF-8 they are, never as Latin-1 (raw 'é' was published as 'Ã©')."""
    value = request.headers.get(name)
    if value is None:
        return None
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise HeaderNotUTF8Error(name) from None


class PublishSlots:
    """At most `size` publishes in progress at once; a publish finding them all taken waits
    up to `wait` seconds for one to be given back.

    A publish holds its request thread while the topic check (up to 10 s) and Pub/Sub's
    acknowledgement (up to --publish-timeout-seconds) take; when Pub/Sub hangs, publishes
    must not take every thread from /healthz and /metrics. While Pub/Sub answers, slots are
    given back every few milliseconds, so a burst of more clients than slots waits a moment
    instead of being refused. A wait that runs out means slots are not coming back (Pub/Sub
    hangs, or is far slower than the load): from then until a slot is given back, a publish
    finding no free slot is refused at once, so waiting publishes hold threads for at most
    one wait. A refusal answers 503, is counted
    `eventaudit_publisher_refused_total{reason="busy"}` and logged at most once per
    `log_interval` seconds with the count since the last line. Waiters take freed slots
    before later arrivals.
    """

    def __init__(
        self,
        size: int,
        refused: Counter,
        wait: float = 0.0,
        log_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.size = size
        self.wait = wait
        self._refused = refused
        self._log_interval = log_interval
        self._clock = clock
        self._cond = threading.Condition()
        self._free = size
        self._waiting = 0
        self._stalled = False  # the last wait ran out and no slot was given back since
        self._unlogged = 0
        self._logged_at: float | None = None

    @property
    def waiting(self) -> int:
        """Publishes waiting for a slot now."""
        with self._cond:
            return self._waiting

    @property
    def stalled(self) -> bool:
        """True from a wait that ran out until a slot is given back: no publish waits then."""
        with self._cond:
            return self._stalled

    def acquire(self) -> bool:
        """Take a slot, waiting for one if need be; False (counted, logged now and then) when
        none is free and none comes back in time, or at once while stalled."""
        with self._cond:
            if self._free > self._waiting:  # the free slots not promised to a waiter
                self._free -= 1
                return True
            if not self._stalled and self.wait > 0:
                deadline = self._clock() + self.wait
                self._waiting += 1
                try:
                    while not self._free:
                        remaining = deadline - self._clock()
                        if remaining <= 0:
                            self._stalled = True
                            break
                        self._cond.wait(remaining)
                    else:
                        self._free -= 1
                        return True
                finally:
                    self._waiting -= 1
            self._unlogged += 1
            now = self._clock()
            if self._logged_at is not None and now - self._logged_at < self._log_interval:
                count = 0
            else:
                count, self._unlogged, self._logged_at = self._unlogged, 0, now
        self._refused.labels("busy").inc()
        if count:
            log.warning(
                "%d publishes refused (503): all %d publish slots are waiting on Pub/Sub and "
                "none was given back within %gs",
                count,
                self.size,
                self.wait,
            )
        return False

    def release(self) -> None:
        """Give back a slot taken by acquire()."""
        with self._cond:
            if self._free >= self.size:
                raise ValueError("PublishSlots released more often than acquired")
            self._free += 1
            self._stalled = False
            self._cond.notify()


def _publish(topic: str, payload: dict[str, Any]) -> PublishedEvent | tuple[Response, int]:
    """Publish and wait for Pub/Sub within a publish slot, mapping failures to HTTP answers."""
    slots: PublishSlots = current_app.config["PUBLISH_SLOTS"]
    if not slots.acquire():
        resp, status = json_error(503, "too many publishes in flight; retry later")
        resp.headers["Retry-After"] = str(BUSY_RETRY_AFTER_SECONDS)
        return resp, status
    try:
        return _publish_in_slot(topic, payload)
    finally:
        slots.release()


def _publish_in_slot(topic: str, payload: dict[str, Any]) -> PublishedEvent | tuple[Response, int]:
    try:
        options = _header("X-Event-Options")
        attributes = _header("X-Event-Attributes")
        ordering_key = _header("X-Ordering-Key") or ""
    except HeaderNotUTF8Error as exc:
        return json_error(400, str(exc))
    try:
        event = _deps().publisher.publish(
            topic,
            payload,
            # ASCII by their grammar: anything else is refused (the id) or ignored (a trace).
            event_id=request.headers.get("X-Event-ID"),
            trace=TraceContext.from_headers(dict(request.headers)),
            options=options,
            attributes=attributes,
            ordering_key=ordering_key,
        )
    except InvalidMessageError as exc:
        return json_error(400, f"X-Event-ID: {exc}")
    except InvalidOptionsError as exc:
        return json_error(400, f"X-Event-Options: {exc}")
    except InvalidAttributesError as exc:
        return json_error(400, f"X-Event-Attributes: {exc}")
    except InvalidOrderingKeyError as exc:
        return json_error(400, f"X-Ordering-Key: {exc}")
    except InvalidEventError as exc:  # the payload (or the topic id, for library callers)
        return json_error(400, str(exc))
    except TopicNotFoundError:
        return json_error(404, f"topic {topic!r} does not exist")
    except TopicUnverifiedError as exc:  # counted and logged by the publisher
        return json_error(503, f"{exc}: set --topics")
    except MessageTooLargeError:
        return json_error(413, "the message exceeds Pub/Sub's limit of 10 MB")
    except RuntimeError as exc:  # a stopped client refuses publishes; logged by publish()
        return json_error(503, f"publish refused: {type(exc).__name__}")
    try:
        event.message_id(timeout=_settings().publish_timeout_seconds)
    except gexc.NotFound:
        return json_error(404, f"topic {topic!r} does not exist")
    except PUBLISH_TIMEOUTS:
        return json_error(
            504, "Pub/Sub did not acknowledge the publish in time", eventID=event.event_id
        )
    except Exception as exc:  # the client surfaces many transport errors; all mean 'not published'
        log.warning("publish to %s failed: %s", topic, exc)
        return json_error(502, f"publish failed: {type(exc).__name__}", eventID=event.event_id)
    return event


def _metadata(event: PublishedEvent) -> dict[str, str]:
    return {
        CLOUD_TRACE_CONTEXT: event.attributes[CLOUD_TRACE_CONTEXT],
        OPTIONS: event.attributes[OPTIONS],
        EVENT_ID: event.event_id,
    }


@bp.post("/api/v1/users")
def create_user() -> Any:
    """The proof of concept's demo: publish a generated user to the users topic."""
    body = _json_body(required=False)
    if isinstance(body, tuple):
        return body
    try:
        overrides = UserOverrides.model_validate(body)
    except ValidationError as exc:
        # Where and why, never the input itself (980 levels of it recursed in the answer), and
        # the first five only (each unknown field is one).
        details = [
            {
                "loc": [_clip(p, 64) if isinstance(p, str) else p for p in e["loc"]],
                "msg": e["msg"],
                "type": e["type"],
            }
            for e in exc.errors(include_url=False, include_input=False, include_context=False)[:5]
        ]
        return json_error(400, "invalid user fields", details=details)
    payload = {
        "userId": str(uuid.uuid4()),
        "name": overrides.name or random.choice(_NAMES),
        "age": overrides.age if overrides.age is not None else random.randint(18, 80),
        "gender": overrides.gender or random.choice(("female", "male")),
    }
    result = _publish(_settings().users_topic, payload)
    if isinstance(result, tuple):
        return result
    return jsonify(payload=payload, traceID=result.trace.trace_id, metadata=_metadata(result))


@bp.post("/api/v1/topics/<topic>/events")
def publish_event(topic: str) -> Any:
    """Publish the JSON object in the body to `topic`, honouring incoming trace headers."""
    if not is_pubsub_id(topic):
        return json_error(400, f"invalid topic id {echo(topic)}")
    allowed = _settings().topic_allow_list
    if allowed and topic not in allowed:
        return json_error(404, f"topic {topic!r} is not published by this API")
    body = _json_body(required=True)
    if isinstance(body, tuple):
        return body
    result = _publish(topic, body)
    if isinstance(result, tuple):
        return result
    return (
        jsonify(
            topic=topic,
            eventID=result.event_id,
            messageId=result.future.result(),
            traceID=result.trace.trace_id,
            metadata=_metadata(result),
        ),
        201,
    )


@bp.get("/healthz")
def healthz() -> Any:
    """Healthy while it can publish and record; the store's state is reported, not fatal (the
    buffer holds records through an outage), but a stopped record writer is: 503."""
    deps = _deps()
    up = deps.registry.get_sample_value("eventaudit_publisher_store_up")
    body = {"store": "ok" if up == 1 else "unavailable", "recordBuffer": deps.buffer.depth()}
    if not deps.buffer.writer_alive():
        return json_error(
            503,
            "publish record writer is not running: publish records are not being written",
            **body,
        )
    return jsonify(status="ok", **body)


def create_app(settings: PublisherSettings, deps: PublisherDeps) -> Flask:
    """The publisher API."""
    app = Flask("publisher")
    app.config.update(SETTINGS=settings, DEPS=deps, MAX_CONTENT_LENGTH=settings.max_body_bytes)
    # Topics this API is configured to publish to are published even when a least-privilege
    # service account cannot check that they exist; any other name is then refused (503).
    deps.publisher.topics.trust_only({settings.users_topic, *settings.topic_allow_list})
    app.config["PUBLISH_SLOTS"] = PublishSlots(
        settings.publish_slots,
        deps.publisher.metrics.refused,
        wait=settings.publish_slot_wait_seconds,
    )
    app.register_blueprint(bp)
    app.add_url_rule("/metrics", "metrics", metrics_view(deps.registry))
    register_json_errors(app)
    return app
