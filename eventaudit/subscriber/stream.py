"""The streaming pull of one subscription, kept alive, and what /healthz says about it.

The client library reopens a stream that fails with a retryable error (UNAVAILABLE,
RESOURCE_EXHAUSTED...) by itself, silently: a message the channel cannot take stalls the
subscription for good while the future looks fine. So every StreamingPull stream that ends
with an error is counted by a gRPC interceptor, and repeated failures with no delivery in
between turn /healthz to 503. A stream the library gives up on (NOT_FOUND when the
subscription is deleted, PERMISSION_DENIED...) ends the future: the session subscribes again
with capped backoff, 503 meanwhile, and resumes when the subscription is back.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from google.api_core import exceptions
from google.cloud import pubsub_v1
from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger(__name__)

STREAMING_PULL = "/google.pubsub.v1.Subscriber/StreamingPull"
NOT_FOUND = "subscription not found"
RESTART_REASONS = ("not_found", "error")
# Stream errors that mean "not receiving" by themselves (see StreamHealth).
_FAILING_AT_ONCE = frozenset({"RESOURCE_EXHAUSTED"})


class StreamMetrics:
    """The stream's metrics, on the registry given."""

    def __init__(self, registry: CollectorRegistry, subscription: str) -> None:
        self.errors = Counter(
            "eventaudit_subscriber_stream_errors_total",
            "StreamingPull streams that ended with an error, by gRPC status code (the client "
            "reopens most of them by itself; a message too large for the channel shows here).",
            ["subscription", "code"],
            registry=registry,
        )
        self.restarts = Counter(
            "eventaudit_subscriber_stream_restarts_total",
            "Streaming pulls that ended for good and were subscribed again, by reason: "
            "not_found (the subscription does not exist) or error.",
            ["subscription", "reason"],
            registry=registry,
        )
        self.healthy = Gauge(
            "eventaudit_subscriber_stream_healthy",
            "1 while the streaming pull is up and not failing (what /healthz reports).",
            ["subscription"],
            registry=registry,
        )
        self.subscription = subscription
        for reason in RESTART_REASONS:
            self.restarts.labels(subscription, reason)


class StreamEndCounter(grpc.StreamStreamClientInterceptor):
    """A gRPC client interceptor that reports the status code of every StreamingPull stream
    when it ends (OK and CANCELLED, our own shutdown, are not errors)."""

    def __init__(self, on_error: Callable[[grpc.StatusCode], None]) -> None:
        self._on_error = on_error

    def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: Any, request_iterator: Any
    ) -> Any:
        call = continuation(details, request_iterator)
        if details.method == STREAMING_PULL:
            call.add_done_callback(self._done)
        return call

    def _done(self, call: Any) -> None:
        try:
            code = call.code()
            if code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
                self._on_error(code)
        except Exception:  # runs on gRPC's threads: never raise there
            log.exception("could not read how a StreamingPull stream ended")


@dataclass(frozen=True, slots=True)
class Health:
    """The stream as /healthz reports it; `reason` is short and fixed, never a raw error."""

    ok: bool
    reason: str | None = None


class StreamHealth:
    """Decides whether the stream is delivering, from stream errors and deliveries.

    Failing: `failures` stream errors within `window` seconds, with no message delivered
    since the first of them. One error is routine: Pub/Sub ends every stream with a non-OK
    status (UNAVAILABLE, about every 30 minutes) and the client reopens it; an unreachable
    broker fails reopened streams within seconds. RESOURCE_EXHAUSTED is failing at once,
    until a message is delivered or `window` passes without another: it is a message larger
    than the channel takes (which fails the stream again on every redelivery) or a quota.
    An idle healthy subscription stays healthy however quiet it is.
    """

    def __init__(
        self,
        metrics: StreamMetrics,
        failures: int = 2,
        window: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self._failures = failures
        self._window = window
        self._clock = clock
        self._lock = threading.Lock()
        # (time, deliveries at that time, code) of the latest stream errors.
        self._errors: collections.deque[tuple[float, int, str]] = collections.deque(maxlen=failures)
        self._error_children: dict[str, Any] = {}
        self.deliveries = 0  # bumped by the callback; compared, never reported
        self._stopped: str | None = "starting"
        metrics.healthy.labels(metrics.subscription).set_function(lambda: float(self.state().ok))

    def delivered(self) -> None:
        """One message reached the callback (called per message: keep it cheap)."""
        self.deliveries += 1

    def stream_error(self, code: grpc.StatusCode) -> None:
        """A StreamingPull stream ended with `code` (from the interceptor)."""
        name = code.name
        child = self._error_children.get(name)
        if child is None:
            child = self._error_children[name] = self._metrics.errors.labels(
                self._metrics.subscription, name
            )
        child.inc()
        with self._lock:
            self._errors.append((self._clock(), self.deliveries, name))

    def set_stopped(self, reason: str | None) -> None:
        """The session's own state: None while a stream runs, else why there is none."""
        self._stopped = reason

    def state(self) -> Health:
        """Healthy, or unhealthy with a short reason."""
        if self._stopped is not None:
            return Health(False, self._stopped)
        with self._lock:
            errors = list(self._errors)
        now = self._clock()
        if errors:
            last_time, last_deliveries, last_code = errors[-1]
            if (
                last_code in _FAILING_AT_ONCE
                and last_deliveries == self.deliveries
                and now - last_time <= self._window
            ):
                return Health(False, f"stream failing: {last_code}")
        if len(errors) == self._failures:
            first_time, first_deliveries, _ = errors[0]
            if now - first_time <= self._window and first_deliveries == self.deliveries:
                return Health(False, f"stream failing: {errors[-1][2]}")
        return Health(True)


class Subscriber(Protocol):
    """The part of pubsub_v1.SubscriberClient a session uses."""

    def subscribe(
        self, subscription: str, callback: Callable[[Any], None], flow_control: Any
    ) -> Any: ...


class StreamSession:
    """Subscribes, and subscribes again with capped backoff whenever the stream ends."""

    def __init__(
        self,
        client: Subscriber,
        subscription_path: str,
        callback: Callable[[Any], None],
        health: StreamHealth,
        metrics: StreamMetrics,
        flow_control: pubsub_v1.types.FlowControl | None = None,
        backoff: tuple[float, float] = (1.0, 30.0),
        stable_seconds: float = 5.0,
    ) -> None:
        self._client = client
        self._path = subscription_path
        self._callback = callback
        self._health = health
        self._metrics = metrics
        self._flow = flow_control or pubsub_v1.types.FlowControl()
        self._backoff = backoff
        self._stable = stable_seconds

    def _deliver(self, message: Any) -> None:
        self._health.delivered()
        self._callback(message)

    def run(self, stop: threading.Event, poll: float = 0.2, cancel_timeout: float = 10.0) -> None:
        """Pull until `stop` is set; never returns on a stream failure."""
        delay = self._backoff[0]
        first = True
        while not stop.is_set():
            started = time.monotonic()
            deliveries = self._health.deliveries
            future = self._client.subscribe(
                self._path, callback=self._deliver, flow_control=self._flow
            )
            if first:  # start-up found the subscription; after a failure, wait for proof
                self._health.set_stopped(None)
                first = False
            while not stop.wait(poll) and not future.done():
                running = time.monotonic() - started >= self._stable
                if running or self._health.deliveries != deliveries:
                    self._health.set_stopped(None)
                    delay = self._backoff[0]
            if stop.is_set():
                future.cancel()
                with contextlib.suppress(Exception):  # a cancelled future raises; nothing lost
                    future.result(timeout=cancel_timeout)
                return
            error = future.exception()
            not_found = isinstance(error, exceptions.NotFound)
            self._metrics.restarts.labels(
                self._metrics.subscription, "not_found" if not_found else "error"
            ).inc()
            reason = NOT_FOUND if not_found else f"streaming pull stopped: {_code(error)}"
            self._health.set_stopped(reason)
            log.error(
                "streaming pull on %s ended (%s): %s; subscribing again in %.3g s",
                self._path,
                reason,
                error,
                delay,
            )
            stop.wait(delay)
            delay = min(delay * 2, self._backoff[1])


def _code(error: BaseException | None) -> str:
    """A short, bounded name for why a stream ended (never the raw message)."""
    if isinstance(error, exceptions.GoogleAPICallError) and error.grpc_status_code is not None:
        return str(error.grpc_status_code.name)
    return type(error).__name__ if error is not None else "ended"
