"""Receipts from a consumer in another language: a Node consumer using Google's official
Pub/Sub client (tests/node, installed by `make setup`) handles audited events, publishes one
receipt message per delivery to an audit topic and acks; the subscriber service with
`--receipts` turns them into receipts on FerretDB. Then forged and malformed receipt messages,
published straight to the audit topic, are counted and never recorded."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from eventaudit.contract import TraceContext, build_attributes, epoch_ms, utc_now_ms
from eventaudit.pubsub import publisher_client
from eventaudit.store import MongoStore
from tests.conftest import PROJECT, Ferret, service_env, unique, wait_for
from tests.integration.harness import received_count
from tests.integration.http_client import metric
from tools import stack

NODE_DIR = Path(__file__).resolve().parents[1] / "node"


@pytest.fixture
def relay(
    ferret: Ferret, emulator: str, store: MongoStore, tmp_path: Path
) -> Iterator[tuple[str, str, str, str]]:
    """An audited topic with a subscription for the Node consumer, an audit topic, and the
    relay (the subscriber service with --receipts) on its subscription: (topic, subscription,
    audit topic, the relay's URL)."""
    topic, sub = unique("relay"), unique("relay-node")
    audit, relay_sub = unique("receipts"), unique("receipts-relay")
    stack.create_topic(PROJECT, topic, [sub])
    stack.create_topic(PROJECT, audit, [relay_sub])
    port = stack.free_port()
    url = f"http://127.0.0.1:{port}"
    service = stack.python_service(
        "relay",
        "subscriber",
        ["--subscription", relay_sub, "--receipts", "--listen-address", f"127.0.0.1:{port}"],
        tmp_path,
        service_env(ferret, emulator, store.database),
        f"{url}/healthz",
    ).start()
    yield topic, sub, audit, url
    service.stop()


def _outcome(url: str, outcome: str) -> float:
    labels = {"outcome": outcome}
    value = metric(f"{url}/metrics", "eventaudit_subscriber_messages_total", labels)
    assert value is not None
    return value


def test_a_node_consumers_receipts_are_recorded_on_its_subscription(
    relay: tuple[str, str, str, str], store: MongoStore, emulator: str
) -> None:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "@google-cloud" / "pubsub").exists():
        pytest.fail("node or tests/node/node_modules missing: run `make setup`")
    topic, sub, audit, url = relay
    client = publisher_client()
    path = client.topic_path(PROJECT, topic)
    published = {}
    for n in range(20):
        event_id = f"node-{n}"
        attrs = build_attributes(event_id, utc_now_ms(), TraceContext.new())
        published[event_id] = client.publish(path, b'{"n": 1}', **attrs).result(timeout=30)
    done = subprocess.run(
        [node, str(NODE_DIR / "consumer.js"), PROJECT, sub, topic, audit, "20"],
        env={**os.environ, "PUBSUB_EMULATOR_HOST": emulator},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    wait_for(lambda: received_count(store, sub) == 20, 60, "20 receipts relayed from Node")
    docs = {d["eventID"]: d for d in store.received.find({"subscription": sub})}
    assert {e: d["messageId"] for e, d in docs.items()} == published  # Pub/Sub's own ids
    assert {d["topic"] for d in docs.values()} == {topic}
    assert all(d["deliveries"] >= 1 for d in docs.values())
    assert _outcome(url, "recorded") >= 20

    # Forged and malformed receipt messages, straight to the audit topic: none is recorded.
    audit_path = client.topic_path(PROJECT, audit)
    good = {
        **build_attributes("forged", utc_now_ms(), TraceContext.new()),
        "ea.subscription": sub,
        "ea.topic": topic,
        "ea.messageId": "1",
        "ea.publishTime": str(epoch_ms(utc_now_ms())),
    }
    hostile = [
        ({**good, "ea.topic": "some-other-topic"}, "relay_rejected"),  # forged topic
        ({**good, "ea.subscription": "no-such-subscription"}, "relay_rejected"),
        ({**good, "ea.publishTime": "\u0661\u0662\u0663"}, "invalid"),
        ({k: v for k, v in good.items() if k != "eventID"}, "invalid"),
        ({k: v for k, v in good.items() if k != "ea.messageId"}, "invalid"),
    ]
    before = {o: _outcome(url, o) for o in ("relay_rejected", "invalid")}
    for attributes, _ in hostile:
        client.publish(audit_path, b"", **attributes).result(timeout=30)
    expected = {o: before[o] + sum(1 for _, w in hostile if w == o) for o in before}
    wait_for(
        lambda: {o: _outcome(url, o) for o in before} == expected,
        60,
        f"the hostile receipt messages counted {expected}",
    )
    assert received_count(store, sub) == 20
    assert store.received.count_documents({"eventID": "forged"}) == 0
