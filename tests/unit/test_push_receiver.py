"""The audited push receiver: 2xx only once the receipt is stored, never without one; group
commit; hostile pushes refused with nothing recorded; OIDC tokens checked against keys this
test makes. On the in-memory store (tests/integration/test_push.py: the real service, pushed
to by the Pub/Sub emulator, on FerretDB)."""

from __future__ import annotations

import base64
import io
import json
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from flask import Flask
from google.auth import crypt, jwt
from prometheus_client import CollectorRegistry

from eventaudit.contract import TraceContext, build_attributes
from eventaudit.push import PushMiddleware, PushReceiver, TokenVerifier, push_blueprint
from eventaudit.push.envelope import push_body
from eventaudit.push.oidc import Unauthorized
from eventaudit.records import Receipt
from tests.fakes import MemoryStore

SUB, TOPIC = "create-user-push", "create-user"
PATH = f"projects/eventaudit-local/subscriptions/{SUB}"
T0 = datetime(2026, 12, 8, 10, 0, tzinfo=UTC)
AUDIENCE, ACCOUNT = (
    "https://push.example.com/push",
    "pusher@eventaudit-local.iam.gserviceaccount.com",
)


def push(event_id: str = "e1", message_id: str = "m1", **attributes: str) -> bytes:
    attrs = build_attributes(event_id, T0, TraceContext.new()) if event_id else {}
    attrs.update(attributes)
    return push_body("eventaudit-local", SUB, message_id, T0, b"{}", attrs)


def outcome(registry: CollectorRegistry, name: str) -> float:
    value = registry.get_sample_value("eventaudit_push_requests_total", {"outcome": name})
    assert value is not None
    return value


@pytest.fixture
def kit() -> Iterator[tuple[PushReceiver, MemoryStore, CollectorRegistry]]:
    store, registry = MemoryStore(), CollectorRegistry()
    receiver = PushReceiver(store, {SUB: TOPIC}, registry, timeout=5)
    receiver.start()
    yield receiver, store, registry
    receiver.stop()


def test_a_push_is_answered_204_once_its_receipt_is_stored(kit: Any) -> None:
    receiver, store, registry = kit
    answer = receiver.handle(push(), None)
    assert (answer.status, answer.body) == (204, None)
    receipt = store.receipt(SUB, "e1")  # stored before the answer
    assert (receipt["topic"], receipt["messageId"], receipt["deliveries"]) == (TOPIC, "m1", 1)
    assert outcome(registry, "acked") == 1


def test_a_replayed_push_is_one_more_delivery_never_a_second_event(kit: Any) -> None:
    receiver, store, _ = kit
    assert receiver.handle(push(), None).status == 204
    assert receiver.handle(push(), None).status == 204
    assert store.receipt(SUB, "e1")["deliveries"] == 2
    assert len(store.received) == 1


def test_a_handler_that_raises_is_answered_500_and_nothing_is_recorded() -> None:
    store, registry = MemoryStore(), CollectorRegistry()

    def handler(message: Any) -> None:
        raise RuntimeError("boom")

    receiver = PushReceiver(store, {SUB: TOPIC}, registry, handler)
    receiver.start()
    try:
        answer = receiver.handle(push(), None)
    finally:
        receiver.stop()
    assert answer.status == 500 and answer.body is not None
    assert store.received == {}
    assert outcome(registry, "handler_error") == 1


def test_the_handler_sees_the_message_and_runs_before_the_receipt() -> None:
    store, seen = MemoryStore(), []

    def handler(message: Any) -> None:
        seen.append((message.data, message.attributes["eventID"], len(store.received)))

    receiver = PushReceiver(store, {SUB: TOPIC}, CollectorRegistry(), handler)
    receiver.start()
    try:
        assert receiver.handle(push(), None).status == 204
    finally:
        receiver.stop()
    assert seen == [(b"{}", "e1", 0)]


def test_a_store_failure_is_answered_503_and_the_next_push_records_it(kit: Any) -> None:
    receiver, store, registry = kit
    store.fail_next = 1
    answer = receiver.handle(push(), None)
    assert answer.status == 503
    assert store.received == {}
    assert receiver.handle(push(), None).status == 204
    assert store.receipt(SUB, "e1")["deliveries"] == 1
    assert outcome(registry, "not_stored") == 1


class SlowStore(MemoryStore):
    """Receipt writes wait for `release` (a store slower than the push's timeout)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()
        self.writes: list[int] = []

    def record_receipts(self, receipts: Sequence[Receipt], now: datetime) -> None:
        self.entered.set()
        self.release.wait(30)
        self.writes.append(len(receipts))
        super().record_receipts(receipts, now)


def test_a_receipt_not_stored_in_time_is_answered_503_and_counts_the_next_push_a_duplicate() -> (
    None
):
    store, registry = SlowStore(), CollectorRegistry()
    receiver = PushReceiver(store, {SUB: TOPIC}, registry, timeout=0.2)
    receiver.start()
    try:
        assert receiver.handle(push(), None).status == 503
        store.release.set()
        assert receiver.handle(push(), None).status == 204
    finally:
        receiver.stop()
    assert store.receipt(SUB, "e1")["deliveries"] == 2  # stored late: never lost
    assert outcome(registry, "timeout") == 1


def test_concurrent_pushes_are_written_in_groups() -> None:
    """While one write is under way, every receipt that arrives waits for the next one: 16
    pushes at once make 2 writes, not 16."""
    store = SlowStore()
    receiver = PushReceiver(store, {SUB: TOPIC}, CollectorRegistry(), timeout=30)
    receiver.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            first = pool.submit(receiver.handle, push("e0", "m0"), None)
            assert store.entered.wait(10)  # the first write is under way
            rest = [
                pool.submit(receiver.handle, push(f"e{i}", f"m{i}"), None) for i in range(1, 16)
            ]
            while _queued(receiver) < 15:
                time.sleep(0.001)
            store.release.set()
            answers = [f.result().status for f in [first, *rest]]
    finally:
        receiver.stop()
    assert answers == [204] * 16
    assert store.writes == [1, 15]
    assert len(store.received) == 16


def _queued(receiver: PushReceiver) -> int:
    """Receipts waiting for the next write (what the pending-receipts gauge shows)."""
    return receiver._audited[SUB]._queue.qsize()


def test_a_message_without_audit_attributes_is_acked_without_a_receipt(kit: Any) -> None:
    receiver, store, registry = kit
    assert receiver.handle(push(event_id=""), None).status == 204
    assert store.received == {}
    invalid = registry.get_sample_value(
        "eventaudit_subscriber_messages_total", {"subscription": SUB, "outcome": "invalid"}
    )
    assert invalid == 1


@pytest.mark.parametrize(
    ("raw", "status", "counted"),
    [
        (b"not json", 400, "invalid_envelope"),
        (push().replace(SUB.encode(), b"other-sub"), 404, "unknown_subscription"),
        (push().replace(b'"m1"', b"1"), 400, "invalid_envelope"),
    ],
)
def test_a_push_that_is_not_one_of_ours_is_refused_and_nothing_recorded(
    kit: Any, raw: bytes, status: int, counted: str
) -> None:
    receiver, store, registry = kit
    answer = receiver.handle(raw, None)
    assert answer.status == status and answer.body is not None
    assert answer.body["status"] == status and answer.body["error"]
    assert store.received == {}
    assert outcome(registry, counted) == 1


# -- OIDC ------------------------------------------------------------------------------------


def _key(key_id: str = "k1") -> tuple[crypt.RSASigner, str]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return crypt.RSASigner.from_string(pem, key_id=key_id), public


SIGNER, PUBLIC = _key()
HOUR_AGO = int(time.time()) - 3600


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


NESTED = f"{_b64(b'[' * 3000)}.{_b64(b'{}')}.AAAA"
OTHER, _ = _key()


def token(signer: crypt.RSASigner = SIGNER, **claims: Any) -> str:
    now = int(time.time())
    payload = {
        "iss": "https://accounts.google.com",
        "aud": AUDIENCE,
        "email": ACCOUNT,
        "email_verified": True,
        "iat": now,
        "exp": now + 3600,
        **claims,
    }
    return jwt.encode(signer, {k: v for k, v in payload.items() if v is not None}).decode()


def unsigned(**claims: Any) -> str:
    def part(doc: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()

    real = jwt.decode(token(**claims), verify=False)
    return f"{part({'alg': 'none', 'typ': 'JWT', 'kid': 'k1'})}.{part(real)}."


class Fetches:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self, url: str) -> dict[str, str]:
        self.count += 1
        return {"k1": PUBLIC}


@pytest.fixture
def guarded() -> Iterator[tuple[PushReceiver, MemoryStore, Fetches]]:
    store, fetches = MemoryStore(), Fetches()
    verifier = TokenVerifier(AUDIENCE, ACCOUNT, "http://certs.invalid/", fetch=fetches)
    receiver = PushReceiver(store, {SUB: TOPIC}, CollectorRegistry(), verifier=verifier)
    receiver.start()
    yield receiver, store, fetches
    receiver.stop()


def test_a_push_with_the_subscriptions_token_is_recorded(guarded: Any) -> None:
    receiver, store, _ = guarded
    assert receiver.handle(push(), f"Bearer {token()}").status == 204
    assert store.receipt(SUB, "e1")["deliveries"] == 1


@pytest.mark.parametrize(
    ("authorization", "status", "says"),
    [
        (None, 401, "no Authorization header"),
        ("", 401, "no Authorization header"),
        ("Basic dXNlcjpwYXNz", 401, "Bearer"),
        ("Bearer", 401, "Bearer"),
        ("Bearer not-a-jwt", 401, "not a JWT"),
        ("Bearer " + "a" * 9000, 401, "not a JWT"),
        ("Bearer \u00e9.\u00e9.\u00e9", 401, "not a JWT"),
        ("Bearer " + token(exp=HOUR_AGO, iat=HOUR_AGO - 3600), 401, "not valid"),  # expired
        ("Bearer " + token(aud="https://elsewhere.example.com"), 403, "audience"),
        ("Bearer " + token(exp=None), 401, "not valid"),  # no expiry
        ("Bearer " + token(iat=str(HOUR_AGO)), 401, "not valid"),
        ("Bearer " + NESTED, 401, "not a JWT"),  # google-auth raises RecursionError on it
        ("Bearer " + token(OTHER), 401, "not valid"),  # signed by another key of the same id
        ("Bearer " + unsigned(), 401, "not valid"),
        ("Bearer " + token(iss="https://evil.example.com"), 401, "not issued by Google"),
        ("Bearer " + token(email="someone@example.com"), 403, "service account"),
        ("Bearer " + token(email_verified=False), 403, "service account"),
        ("Bearer " + token(email=None), 403, "service account"),
    ],
)  # fmt: skip
def test_a_push_without_a_valid_token_is_refused_and_nothing_recorded(
    guarded: Any, authorization: str | None, status: int, says: str
) -> None:
    receiver, store, _ = guarded
    answer = receiver.handle(push(), authorization)
    assert answer.status == status and answer.body is not None
    assert says in answer.body["error"]
    assert store.received == {}


def test_tokens_of_unknown_key_ids_fetch_the_keys_at_most_once_every_30_seconds(
    guarded: Any,
) -> None:
    receiver, _, fetches = guarded
    stranger, _ = _key("invented")
    for _ in range(50):
        assert receiver.handle(push(), f"Bearer {token(stranger)}").status == 401
    assert fetches.count == 1


# -- Flask blueprint and WSGI middleware -----------------------------------------------------


def test_the_blueprint_answers_pushes(kit: Any) -> None:
    receiver, store, _ = kit
    app = Flask("app")
    app.register_blueprint(push_blueprint(receiver))
    client = app.test_client()
    assert client.post("/push", data=push()).status_code == 204
    refused = client.post("/push", data=b"{}")
    assert refused.status_code == 400 and "`message`" in refused.get_json()["error"]
    assert store.receipt(SUB, "e1")["deliveries"] == 1


def _wsgi(
    app: Any, method: str, path: str, raw: bytes, length: str | None, terminated: bool = False
) -> tuple[str, bytes]:
    environ = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "wsgi.input": io.BytesIO(raw),
        "wsgi.input_terminated": terminated,
        **({"CONTENT_LENGTH": length} if length is not None else {}),
    }
    got: list[str] = []
    out = b"".join(app(environ, lambda status, headers: got.append(status)))
    return got[0], out


def test_the_middleware_answers_pushes_and_passes_the_rest_on(kit: Any) -> None:
    receiver, store, _ = kit

    def inner(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b"app"]

    app = PushMiddleware(inner, receiver, max_bytes=100_000)
    raw = push()
    assert _wsgi(app, "GET", "/other", b"", None) == ("200 OK", b"app")
    assert _wsgi(app, "POST", "/push", raw, str(len(raw))) == ("204 No Content", b"")
    assert _wsgi(app, "GET", "/push", b"", None)[0] == "405 Method Not Allowed"
    assert _wsgi(app, "POST", "/push", raw, "100001")[0] == "413 Content Too Large"
    for length in ("1e9", "\u0661\u0662", "12\n", "-1", "9" * 40):
        assert _wsgi(app, "POST", "/push", raw, length)[0] == "400 Bad Request", length
    # No length: an empty body (PEP 3333), unless the server read it whole (chunked)
    assert _wsgi(app, "POST", "/push", raw, None)[0] == "400 Bad Request"
    assert _wsgi(app, "POST", "/push", raw, None, terminated=True)[0] == "204 No Content"
    big = b"x" * 100_001
    assert _wsgi(app, "POST", "/push", big, None, terminated=True)[0] == "413 Content Too Large"
    assert store.receipt(SUB, "e1")["deliveries"] == 2


def test_a_token_of_one_subscription_cannot_push_for_another() -> None:
    """The token signs nothing of the body: its audience names the subscription."""
    store, fetches = MemoryStore(), Fetches()
    per_sub = "https://push.example.com/push?s={subscription}"
    verifier = TokenVerifier(per_sub, ACCOUNT, "http://certs.invalid/", fetch=fetches)
    receiver = PushReceiver(
        store, {SUB: TOPIC, "other-sub": TOPIC}, CollectorRegistry(), verifier=verifier
    )
    receiver.start()
    try:
        mine = f"Bearer {token(aud=per_sub.replace('{subscription}', SUB))}"
        forged = push().replace(SUB.encode(), b"other-sub")
        answer = receiver.handle(forged, mine)
        assert answer.status == 403 and answer.body is not None
        assert "audience" in answer.body["error"]
        assert store.received == {}
        assert receiver.handle(push(), mine).status == 204
    finally:
        receiver.stop()


def test_several_subscriptions_under_one_audience_are_refused_at_construction() -> None:
    verifier = TokenVerifier(AUDIENCE, ACCOUNT, "http://certs.invalid/", fetch=Fetches())
    with pytest.raises(ValueError, match="audience per subscription"):
        PushReceiver(
            MemoryStore(), {SUB: TOPIC, "b": TOPIC}, CollectorRegistry(), verifier=verifier
        )


def test_the_signing_keys_are_kept_an_hour_and_a_failed_or_empty_fetch_keeps_them() -> None:
    now = [0.0]
    answers: list[Any] = [{"k1": PUBLIC}, OSError("down"), {}, {"k1": PUBLIC}]
    fetched: list[str] = []

    def fetch(url: str) -> dict[str, str]:
        fetched.append(url)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return dict(answer)

    verifier = TokenVerifier(AUDIENCE, ACCOUNT, "http://certs.invalid/", fetch, lambda: now[0])
    good = f"Bearer {token()}"
    assert verifier.verify(good)["email"] == ACCOUNT
    now[0] = 3599.0
    assert verifier.verify(good)["email"] == ACCOUNT and len(fetched) == 1  # kept
    now[0] = 3601.0  # old: fetched again, which fails; the known keys stay
    assert verifier.verify(good)["email"] == ACCOUNT and len(fetched) == 2
    now[0] = 7202.0  # fetched again: empty; the known keys stay
    assert verifier.verify(good)["email"] == ACCOUNT and len(fetched) == 3
    stranger, _ = _key("invented")
    now[0] = 7210.0  # an unknown key id within 30 s of the last fetch: no fetch
    with pytest.raises(Unauthorized):
        verifier.verify(f"Bearer {token(stranger)}")
    assert len(fetched) == 3
    now[0] = 7233.0  # and past them: one fetch
    with pytest.raises(Unauthorized):
        verifier.verify(f"Bearer {token(stranger)}")
    assert len(fetched) == 4


@pytest.mark.parametrize(
    "handler",
    [
        lambda m: m.ack(),  # as a pull consumer would: the push is the receiver's to answer
        lambda m: m.nack(),
        lambda m: sys.exit(1),
    ],
)
def test_a_handler_cannot_settle_the_push_itself(handler: Any) -> None:
    store = MemoryStore()
    store.fail_next = 1  # were the handler's ack believed, this would be a 204 without receipt
    receiver = PushReceiver(store, {SUB: TOPIC}, CollectorRegistry(), handler)
    receiver.start()
    try:
        answer = receiver.handle(push(), None)
    finally:
        receiver.stop()
    assert answer.status == 500
    assert store.received == {}


def test_a_write_finishing_as_the_push_times_out_is_answered_once_and_consistently() -> None:
    """Whichever settles first, the answer and the store agree: 204 with a receipt, or 503
    (and the receipt, if stored, makes the next push a duplicate)."""
    for delay in (0.0, 0.05, 0.1, 0.15):
        store, registry = SlowStore(), CollectorRegistry()
        receiver = PushReceiver(store, {SUB: TOPIC}, registry, timeout=0.1)
        receiver.start()
        try:
            timer = threading.Timer(delay, store.release.set)
            timer.start()
            answer = receiver.handle(push(), None)
            timer.join()
        finally:
            receiver.stop()
        if answer.status == 204:
            assert store.receipt(SUB, "e1")["deliveries"] == 1
        else:
            assert answer.status == 503
