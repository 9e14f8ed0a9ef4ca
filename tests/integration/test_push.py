"""The push receiver as a service (`python -m eventaudit.push`), pushed to by the Pub/Sub
emulator over HTTP, recording on FerretDB; and its HTTP surface under hostile requests."""

from __future__ import annotations

import http.client
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from eventaudit.contract import TraceContext, build_attributes, utc_now_ms
from eventaudit.pubsub import publisher_client, subscriber_client
from eventaudit.store import MongoStore
from tests.conftest import PROJECT, Ferret, service_env, unique, wait_for
from tests.integration.harness import received_count
from tests.integration.http_client import metric
from tools import stack


@pytest.fixture
def pushed(
    ferret: Ferret, emulator: str, store: MongoStore, tmp_path: Path
) -> Iterator[tuple[str, str, str]]:
    """A topic with a push subscription delivering to a running push receiver: (topic,
    subscription, the receiver's URL)."""
    topic, sub = unique("push"), unique("push-sub")
    port = stack.free_port()
    url = f"http://127.0.0.1:{port}"
    stack.create_topic(PROJECT, topic, [], push={sub: f"{url}/push"})
    service = stack.python_service(
        "push",
        "push",
        ["--subscriptions", sub, "--listen-address", f"127.0.0.1:{port}"],
        tmp_path,
        service_env(ferret, emulator, store.database),
        f"{url}/healthz",
    ).start()
    yield topic, sub, url
    service.stop()


def _metric(url: str, outcome: str) -> float:
    value = metric(f"{url}/metrics", "eventaudit_push_requests_total", {"outcome": outcome})
    assert value is not None
    return value


def test_every_event_the_emulator_pushes_is_recorded_once(
    pushed: tuple[str, str, str], store: MongoStore
) -> None:
    topic, sub, url = pushed
    client = publisher_client()
    path = client.topic_path(PROJECT, topic)
    ids = [f"ev-{n}" for n in range(40)]
    for event_id in ids:
        attrs = build_attributes(event_id, utc_now_ms(), TraceContext.new())
        client.publish(path, b'{"n": 1}', **attrs).result(timeout=30)
    wait_for(lambda: received_count(store, sub) == 40, 60, "40 receipts of pushed events")
    docs = list(store.received.find({"subscription": sub}))
    assert sorted(d["eventID"] for d in docs) == sorted(ids)
    assert {d["topic"] for d in docs} == {topic}
    assert _metric(url, "acked") >= 40  # a push the emulator retried is one more delivery


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, object]]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", "/push", body=body, headers=headers)
        answer = conn.getresponse()
        raw = answer.read()
        return answer.status, json.loads(raw) if raw else {}
    finally:
        conn.close()


def _chunked(url: str, size: int) -> int:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest("POST", "/push")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        chunk = b"x" * 65536
        sent = 0
        try:
            while sent < size:
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
            conn.send(b"0\r\n\r\n")
        except OSError:
            pass  # the server may close once the limit is passed
        return conn.getresponse().status
    finally:
        conn.close()


def test_hostile_pushes_get_a_clear_4xx_and_nothing_is_recorded(
    pushed: tuple[str, str, str], store: MongoStore
) -> None:
    _, sub, url = pushed
    good = {
        "message": {
            "data": "e30=",
            "attributes": build_attributes("hostile", utc_now_ms(), TraceContext.new()),
            "messageId": "1",
            "publishTime": "2026-12-08T10:00:00Z",
        },
        "subscription": f"projects/{PROJECT}/subscriptions/{sub}",
    }
    other = f"projects/{PROJECT}/subscriptions/other"
    garbled = {**good["message"], "data": "%%%"}  # type: ignore[dict-item]
    cases = [
        (b"not json", 400),
        (json.dumps({**good, "subscription": other}).encode(), 404),
        (json.dumps({**good, "message": garbled}).encode(), 400),
        (json.dumps({**good, "deliveryAttempt": 10**30}).encode(), 400),
        (b"[" * 50_000, 400),
    ]
    for body, status in cases:
        got, answer = _post(url, body, {"Content-Type": "application/json"})
        assert (got, answer.get("status")) == (status, status), body[:80]
        assert answer.get("error")
    big = b"x" * (16 * 2**20 + 1)
    assert _post(url, big, {"Content-Type": "application/json"})[0] == 413
    assert _chunked(url, 17 * 2**20) == 413
    assert received_count(store, sub) == 0
    assert _metric(url, "invalid_envelope") == 4
    assert _metric(url, "unknown_subscription") == 1
    # and the receiver still answers
    with urllib.request.urlopen(f"{url}/healthz", timeout=5) as answer:
        assert json.loads(answer.read())["status"] == "ok"


def test_compose_creates_its_push_subscription_with_tools_create_topic(
    emulator: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tools import create_topic

    monkeypatch.setenv("EVENTAUDIT_PROJECT", PROJECT)
    topic, pull, push = unique("ct"), unique("ct-pull"), unique("ct-push")
    url = "http://push:9710/push"
    assert create_topic.main([topic, pull, "--push", f"{push}={url}"]) == 0
    with subscriber_client() as client:
        configs = {
            sub: client.get_subscription(
                subscription=client.subscription_path(PROJECT, sub)
            ).push_config.push_endpoint
            for sub in (pull, push)
        }
    assert configs == {pull: "", push: url}
    for bad in ("no-equals", f"{push}=ftp://x", f"={url}"):
        with pytest.raises(SystemExit) as exited:
            create_topic.main([topic, "--push", bad])
        assert exited.value.code == 2
