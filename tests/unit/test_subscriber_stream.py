"""Stream health, re-subscription and the subscriber's /healthz, with fakes of the client."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import grpc
import pytest
from google.api_core import exceptions
from prometheus_client import CollectorRegistry

from eventaudit import pubsub
from eventaudit.subscriber.service import create_app
from eventaudit.subscriber.stream import (
    NOT_FOUND,
    StreamEndCounter,
    StreamHealth,
    StreamMetrics,
    StreamSession,
)

SUB = "sub-1"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _health(clock: Clock | None = None) -> tuple[StreamHealth, CollectorRegistry]:
    registry = CollectorRegistry()
    health = StreamHealth(StreamMetrics(registry, SUB), clock=clock or Clock())
    health.set_stopped(None)
    return health, registry


def test_idle_stream_stays_healthy() -> None:
    clock = Clock()
    health, registry = _health(clock)
    clock.now += 86_400
    assert health.state().ok
    assert (
        registry.get_sample_value("eventaudit_subscriber_stream_healthy", {"subscription": SUB})
        == 1
    )


def test_one_stream_error_is_not_failing() -> None:
    health, registry = _health()
    health.stream_error(grpc.StatusCode.UNAVAILABLE)
    assert health.state().ok
    assert (
        registry.get_sample_value(
            "eventaudit_subscriber_stream_errors_total",
            {"subscription": SUB, "code": "UNAVAILABLE"},
        )
        == 1
    )


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL])
def test_repeated_errors_without_a_delivery_are_failing_until_one_arrives(
    code: grpc.StatusCode,
) -> None:
    clock = Clock()
    health, registry = _health(clock)
    health.stream_error(code)
    assert health.state().ok
    clock.now += 60
    health.stream_error(code)
    state = health.state()
    assert (state.ok, state.reason) == (False, f"stream failing: {code.name}")
    healthy = {"subscription": SUB}
    assert registry.get_sample_value("eventaudit_subscriber_stream_healthy", healthy) == 0
    health.delivered()
    assert health.state().ok


def test_a_message_too_large_for_the_channel_is_failing_at_once() -> None:
    clock = Clock()
    health, _ = _health(clock)
    health.stream_error(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert health.state() == type(health.state())(False, "stream failing: RESOURCE_EXHAUSTED")
    clock.now += 299
    assert not health.state().ok
    clock.now += 2  # the window passed with no other error: the stream reopened quietly
    assert health.state().ok
    health.stream_error(grpc.StatusCode.RESOURCE_EXHAUSTED)
    health.delivered()
    assert health.state().ok


def test_errors_with_deliveries_between_are_not_failing() -> None:
    health, _ = _health()
    health.stream_error(grpc.StatusCode.UNAVAILABLE)
    health.delivered()
    health.stream_error(grpc.StatusCode.UNAVAILABLE)
    assert health.state().ok


def test_errors_further_apart_than_the_window_are_not_failing() -> None:
    clock = Clock()
    health, _ = _health(clock)
    health.stream_error(grpc.StatusCode.UNAVAILABLE)
    clock.now += 301  # e.g. Pub/Sub's routine stream ends on an idle subscription
    health.stream_error(grpc.StatusCode.UNAVAILABLE)
    assert health.state().ok


def test_a_stopped_stream_reports_its_reason() -> None:
    health, _ = _health()
    health.set_stopped(NOT_FOUND)
    assert health.state() == type(health.state())(False, NOT_FOUND)


class FakeCall:
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        fn(self)

    def code(self) -> grpc.StatusCode:
        return self._code


class Details:
    def __init__(self, method: str) -> None:
        self.method = method


@pytest.mark.parametrize(
    ("method", "code", "counted"),
    [
        ("/google.pubsub.v1.Subscriber/StreamingPull", grpc.StatusCode.RESOURCE_EXHAUSTED, True),
        ("/google.pubsub.v1.Subscriber/StreamingPull", grpc.StatusCode.NOT_FOUND, True),
        ("/google.pubsub.v1.Subscriber/StreamingPull", grpc.StatusCode.CANCELLED, False),
        ("/google.pubsub.v1.Subscriber/StreamingPull", grpc.StatusCode.OK, False),
        ("/google.pubsub.v1.Subscriber/Acknowledge", grpc.StatusCode.UNAVAILABLE, False),
    ],
)
def test_interceptor_reports_streaming_pull_errors_only(
    method: str, code: grpc.StatusCode, counted: bool
) -> None:
    seen: list[grpc.StatusCode] = []
    interceptor = StreamEndCounter(seen.append)
    call = FakeCall(code)
    assert (
        interceptor.intercept_stream_stream(lambda _d, _r: call, Details(method), iter(())) is call
    )
    assert seen == ([code] if counted else [])


def test_interceptor_never_raises_on_grpc_threads() -> None:
    def broken(_code: grpc.StatusCode) -> None:
        raise RuntimeError("bug")

    call = FakeCall(grpc.StatusCode.UNAVAILABLE)
    method = Details("/google.pubsub.v1.Subscriber/StreamingPull")
    StreamEndCounter(broken).intercept_stream_stream(lambda _d, _r: call, method, iter(()))


class FakeFuture(Future[None]):
    """A StreamingPullFuture stand-in: cancel() ends the stream."""

    cancel_called = False

    def cancel(self) -> bool:
        self.cancel_called = True
        if not self.done():
            self.set_result(None)
        return True


class FakeClient:
    """subscribe() returns futures scripted by the test: an exception ends the stream."""

    def __init__(self, outcomes: list[BaseException | None], stop: threading.Event) -> None:
        self.outcomes = outcomes
        self.stop = stop
        self.subscribed = 0
        self.futures: list[FakeFuture] = []

    def subscribe(
        self, subscription: str, callback: Callable[[Any], None], flow_control: Any
    ) -> Any:
        self.subscribed += 1
        future = FakeFuture()
        future.set_running_or_notify_cancel()
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if outcome is not None:
            future.set_exception(outcome)
        else:
            callback("message")  # a delivery: the stream works
            self.stop.set()
        self.futures.append(future)
        return future


def test_session_subscribes_again_with_backoff_until_the_subscription_is_back() -> None:
    stop = threading.Event()
    registry = CollectorRegistry()
    metrics = StreamMetrics(registry, SUB)
    health = StreamHealth(metrics)
    states: list[str | None] = []
    delivered: list[Any] = []

    def callback(message: Any) -> None:
        states.append(health.state().reason)
        delivered.append(message)

    outcomes: list[BaseException | None] = [
        exceptions.NotFound("Subscription does not exist (resource=projects/p/subscriptions/s)"),
        exceptions.NotFound("again"),
        exceptions.PermissionDenied("no"),
        None,
    ]
    client = FakeClient(outcomes, stop)
    session = StreamSession(
        client,
        "projects/p/subscriptions/s",
        callback,
        health,
        metrics,
        backoff=(0.001, 0.004),
        stable_seconds=0.01,
    )
    session.run(stop, poll=0.001)
    assert client.subscribed == 4
    assert delivered == ["message"]
    # The reason stays until the new stream proves itself (the delivery is what proves it).
    assert states == ["streaming pull stopped: PERMISSION_DENIED"]

    def restarts(reason: str) -> float | None:
        return registry.get_sample_value(
            "eventaudit_subscriber_stream_restarts_total", {"subscription": SUB, "reason": reason}
        )

    assert (restarts("not_found"), restarts("error")) == (2, 1)
    # Stopping cancels the running stream, and only that one.
    assert [f.cancel_called for f in client.futures] == [False, False, False, True]


def _app(state: dict[str, Any]) -> Any:
    return create_app(SUB, CollectorRegistry(), lambda: state).test_client()


@pytest.mark.parametrize(
    ("state", "status", "body"),
    [
        (
            {"pulling": True, "reason": None, "store": True},
            200,
            {"status": "ok", "subscription": SUB, "pulling": True, "store": "ok"},
        ),
        (
            {"pulling": True, "reason": None, "store": False},
            200,
            {"status": "ok", "subscription": SUB, "pulling": True, "store": "unavailable"},
        ),
        (
            {"pulling": False, "reason": NOT_FOUND, "store": True},
            503,
            {
                "error": NOT_FOUND,
                "status": 503,
                "subscription": SUB,
                "pulling": False,
                "store": "ok",
            },
        ),
        (
            {"pulling": False, "reason": "stream failing: UNAVAILABLE", "store": False},
            503,
            {
                "error": "stream failing: UNAVAILABLE",
                "status": 503,
                "subscription": SUB,
                "pulling": False,
                "store": "unavailable",
            },
        ),
    ],
)
def test_healthz_answers_short_reasons(state: dict[str, Any], status: int, body: dict) -> None:
    resp = _app(state).get("/healthz")
    assert (resp.status_code, resp.get_json()) == (status, body)


def test_subscriber_client_keeps_the_library_channel_for_real_pubsub(monkeypatch) -> None:
    """Without the emulator, the library's channel (credentials, endpoint) gets our options
    and interceptors; nothing connects until a call is made."""
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    created: list[dict[str, Any]] = []

    def create_channel(*args: Any, **kwargs: Any) -> grpc.Channel:
        created.append(kwargs)
        return grpc.insecure_channel("127.0.0.1:1")

    from google.auth.credentials import AnonymousCredentials

    monkeypatch.setattr(
        pubsub.SubscriberGrpcTransport, "create_channel", staticmethod(create_channel)
    )
    monkeypatch.setattr(
        "google.auth.default", lambda *a, **k: (AnonymousCredentials(), "project-1")
    )
    client = pubsub.subscriber_client([StreamEndCounter(lambda _c: None)])
    assert len(created) == 1
    assert ("grpc.max_receive_message_length", -1) in created[0]["options"]
    assert ("grpc.max_send_message_length", -1) in created[0]["options"]
    assert ("grpc.keepalive_time_ms", 30_000) in created[0]["options"]
    client.close()


def test_emulator_channel_options_lift_the_receive_limit_and_never_ping() -> None:
    options = dict(pubsub.channel_options())
    assert options["grpc.max_receive_message_length"] == -1
    assert options["grpc.max_send_message_length"] == -1
    assert "grpc.keepalive_time_ms" not in options
    assert dict(pubsub.channel_options(1024))["grpc.max_receive_message_length"] == 1024
