"""The audited push receiver: run the handler, make the receipt durable, only then answer 2xx.

A push subscription POSTs each message to an endpoint and takes a 2xx answer as its ack; any
other answer (or none within the ack deadline) makes Pub/Sub push it again. So the receiver
answers 204 only once the message's receipt is stored, and never without one:

- the envelope is read strictly (eventaudit.push.envelope): a body that is not one is 400;
- with a TokenVerifier, a push without a valid Google-signed token of the subscription's
  service account is 401 or 403 (eventaudit.push.oidc);
- a subscription this receiver does not serve is 404;
- the message then goes through the audited subscriber of its subscription, exactly as a
  pulled message does (the same receipts, outcomes, metrics, fault knobs): the handler runs in
  the request's thread; its receipt joins the next group write of that subscription's writer
  thread (every receipt queued while a write is under way goes in the next one: group commit);
  the request waits for the write;
- stored: 204. The handler raised: 500. The store failed, or the write took longer than the
  receiver's timeout: 503 (Pub/Sub pushes it again; a receipt that was stored late counts the
  next push as a duplicate delivery, never a lost one). A message without valid audit
  attributes is acknowledged (204) without a receipt and counted `invalid`, as the pull
  subscriber does: pushing it again could never help.

A replayed push (the same envelope posted again) is one more delivery: counted a duplicate,
never a second received event.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, jsonify, request
from prometheus_client import CollectorRegistry, Counter

from eventaudit.push.envelope import (
    MAX_ENVELOPE_BYTES,
    EnvelopeError,
    PushedMessage,
    parse_envelope,
)
from eventaudit.push.oidc import Forbidden, TokenVerifier, Unauthorized
from eventaudit.store import ReceiptStore
from eventaudit.subscriber.audited import AuditedSubscriber, Faults, SubscriberMetrics

log = logging.getLogger(__name__)

PUSH_OUTCOMES = (
    "acked",
    "invalid_envelope",
    "unauthorized",
    "forbidden",
    "unknown_subscription",
    "handler_error",
    "not_stored",
    "timeout",
)
Handler = Callable[[PushedMessage], None]
"""Your work on a pushed message: it sees the message's fields (no ack or nack: the receiver
answers the push once the receipt is stored)."""


class PushMessage:
    """A pushed message as the audited subscriber sees it (the fields of a pulled message; the
    handler gets `pushed`); ack and nack settle the request waiting on it (the first one
    counts)."""

    def __init__(self, pushed: PushedMessage) -> None:
        self.pushed = pushed
        self.subscription = pushed.subscription
        self.message_id = pushed.message_id
        self.publish_time = pushed.publish_time
        self.attributes = pushed.attributes
        self.delivery_attempt = pushed.delivery_attempt
        self.acked: bool | None = None
        self.handler_failed = False
        self.settled = threading.Event()
        self._lock = threading.Lock()

    def _settle(self, acked: bool) -> bool:
        """Settle once; the value that settled it."""
        with self._lock:
            if self.acked is None:
                self.acked = acked
                self.settled.set()
            return self.acked

    def ack(self) -> None:
        self._settle(True)

    def nack(self) -> None:
        self._settle(False)

    def ack_with_response(self) -> Future[Any]:
        self.ack()
        done: Future[Any] = Future()
        done.set_result(None)
        return done


@dataclass(frozen=True)
class Answer:
    """What the receiver answers a push: a status, and a JSON body unless 204."""

    status: int
    body: dict[str, Any] | None = None


class PushMetrics:
    """eventaudit_push_requests_total{outcome}: every push answered, by what was answered."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "eventaudit_push_requests_total",
            "Pushes answered, by outcome: acked (204, receipt stored, or an invalid message "
            "acknowledged without one); invalid_envelope (400); unauthorized (401); forbidden "
            "(403); unknown_subscription (404); handler_error (500); not_stored and timeout "
            "(503: Pub/Sub pushes them again).",
            ["outcome"],
            registry=registry,
        )
        for outcome in PUSH_OUTCOMES:
            self.requests.labels(outcome)


class PushReceiver:
    """Receives pushes for `subscriptions` (subscription id -> its topic id)."""

    def __init__(
        self,
        store: ReceiptStore,
        subscriptions: Mapping[str, str],
        registry: CollectorRegistry,
        handler: Handler | None = None,
        *,
        verifier: TokenVerifier | None = None,
        timeout: float = 30.0,
        batch_size: int = 500,
        faults: Faults | None = None,
    ) -> None:
        """`handler(message)` is the endpoint's own work; the receipt is made (and 2xx
        answered) only if it returns. `timeout`: the longest a push waits for its receipt to
        be stored (keep it below the subscription's ack deadline)."""
        if verifier is not None and len(subscriptions) > 1 and not verifier.per_subscription:
            raise ValueError(
                "a receiver serving several subscriptions needs an audience per subscription: "
                "put {subscription} in it"
            )
        self._handler = handler
        self._verifier = verifier
        self._timeout = timeout
        self.metrics = PushMetrics(registry)
        # No linger: a write takes every receipt queued while the one before was under way.
        self._audited = {
            sub: AuditedSubscriber(
                store, sub, topic, SubscriberMetrics(registry, sub), batch_size=batch_size,
                flush_interval=0.0, faults=faults, handler=self._run_handler,
            )
            for sub, topic in subscriptions.items()
        }  # fmt: skip

    @property
    def subscriptions(self) -> Iterable[str]:
        return self._audited.keys()

    def start(self) -> None:
        """Start each subscription's receipt writer."""
        for audited in self._audited.values():
            audited.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the writers."""
        for audited in self._audited.values():
            audited.stop(timeout)

    def store_ok(self) -> bool:
        """Whether every subscription's last receipt write succeeded."""
        return all(a.last_write_ok for a in self._audited.values())

    def _run_handler(self, message: Any) -> None:
        """The handler, on the message's fields only (it cannot settle the push itself)."""
        if self._handler is None:
            return
        try:
            self._handler(message.pushed)
        except Exception:
            message.handler_failed = True
            raise
        except BaseException as exc:  # SystemExit and the like from a handler: its failure
            message.handler_failed = True
            raise RuntimeError(f"the handler raised {type(exc).__name__}") from exc

    def handle(self, body: bytes, authorization: str | None) -> Answer:
        """Answer one push (never raises)."""
        answer, outcome = self._handle(body, authorization)
        self.metrics.requests.labels(outcome).inc()
        return answer

    def _handle(self, body: bytes, authorization: str | None) -> tuple[Answer, str]:
        # The token first: an unauthenticated body is not even parsed.
        claims = None
        if self._verifier is not None:
            try:
                claims = self._verifier.verify(authorization)
            except Unauthorized as exc:
                return _error(401, str(exc)), "unauthorized"
            except Forbidden as exc:
                return _error(403, str(exc)), "forbidden"
        try:
            pushed = parse_envelope(body)
        except EnvelopeError as exc:
            return _error(400, str(exc)), "invalid_envelope"
        audited = self._audited.get(pushed.subscription)
        if audited is None:
            return (
                _error(404, f"subscription {pushed.subscription} is not served here"),
                "unknown_subscription",
            )
        if self._verifier is not None and claims is not None:
            try:
                self._verifier.check_audience(claims, pushed.subscription)
            except Forbidden as exc:  # a token of another subscription: a forged envelope
                return _error(403, str(exc)), "forbidden"
        message = PushMessage(pushed)
        audited(message)  # never raises; settles the message now or once its receipt is written
        if not message.settled.wait(self._timeout) and not message._settle(False):
            # Settled now: a receipt written later settles nothing (the next push of it is
            # a duplicate delivery, never a lost event).
            log.warning(
                "push of message %s on %s: receipt not stored within %.0fs, answered 503",
                message.message_id, message.subscription, self._timeout,
            )  # fmt: skip
            return _error(503, "the receipt was not stored in time; push again"), "timeout"
        if message.handler_failed:
            return _error(500, "the handler failed; push again"), "handler_error"
        if message.acked:
            return Answer(204), "acked"
        return _error(503, "the receipt could not be stored; push again"), "not_stored"


def _error(status: int, message: str) -> Answer:
    return Answer(status, {"error": message, "status": status})


def push_blueprint(receiver: PushReceiver, path: str = "/push") -> Blueprint:
    """A Flask blueprint answering pushes at POST `path` (set the app's MAX_CONTENT_LENGTH,
    or serve it with eventaudit.serving, to bound bodies)."""
    blueprint = Blueprint("eventaudit_push", __name__)

    @blueprint.post(path)
    def push() -> Any:
        answer = receiver.handle(
            request.get_data(cache=False), request.headers.get("Authorization")
        )
        if answer.body is None:
            return Response(status=answer.status)
        return jsonify(answer.body), answer.status

    return blueprint


class PushMiddleware:
    """WSGI middleware: POSTs to `path` are pushes for `receiver`; anything else goes to `app`
    (for WSGI apps that are not Flask). Bodies over `max_bytes` are answered 413 unread."""

    def __init__(
        self,
        app: Callable[..., Iterable[bytes]],
        receiver: PushReceiver,
        path: str = "/push",
        max_bytes: int = MAX_ENVELOPE_BYTES,
    ) -> None:
        self._app = app
        self._receiver = receiver
        self._path = path
        self._max = max_bytes

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != self._path:
            return self._app(environ, start_response)
        if environ.get("REQUEST_METHOD") != "POST":
            return _respond(start_response, _error(405, "pushes are POSTed"), (("Allow", "POST"),))
        body = _read_body(environ, self._max)
        if isinstance(body, Answer):
            return _respond(start_response, body)
        answer = self._receiver.handle(body, environ.get("HTTP_AUTHORIZATION"))
        return _respond(start_response, answer)


def _read_body(environ: dict[str, Any], limit: int) -> bytes | Answer:
    """The request body; or the answer to a length that is not one (400) or is over `limit`
    bytes (413)."""
    stream = environ["wsgi.input"]
    length = str(environ.get("CONTENT_LENGTH") or "")
    if length:
        if not (length.isascii() and length.isdigit()) or len(length) > 12:
            return _error(400, "Content-Length is not a length")
        if int(length) > limit:
            return _error(413, f"body over {limit} bytes")
        return bytes(stream.read(int(length)))
    if not environ.get("wsgi.input_terminated"):
        return b""  # PEP 3333: without a length the body is empty, unless the server says so
    # Chunked, read by the server: to the end, at most one byte past the limit.
    parts, total = [], 0
    while total <= limit:
        part = stream.read(min(65536, limit + 1 - total))
        if not part:
            break
        parts.append(part)
        total += len(part)
    return _error(413, f"body over {limit} bytes") if total > limit else b"".join(parts)


def _respond(
    start_response: Callable[..., Any], answer: Answer, headers: tuple[tuple[str, str], ...] = ()
) -> Iterator[bytes]:
    reason = {204: "No Content", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
              404: "Not Found", 405: "Method Not Allowed", 413: "Content Too Large",
              500: "Internal Server Error", 503: "Service Unavailable"}  # fmt: skip
    status = f"{answer.status} {reason.get(answer.status, '')}".strip()
    if answer.body is None:
        start_response(status, [*headers, ("Content-Length", "0")])
        return iter([])
    data = json.dumps(answer.body).encode()
    start_response(
        status,
        [*headers, ("Content-Type", "application/json"), ("Content-Length", str(len(data)))],
    )
    return iter([data])
