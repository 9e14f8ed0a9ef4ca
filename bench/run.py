"""Benchmarks: each prints a ratio against a baseline measured in the same run.

    make bench                    # all three
    python -m bench.run publisher # one of: publisher, subscriber, exporter

- publisher: events/s through the publisher API with auditing (AuditedPublisher + record
  buffer into FerretDB) against the same Flask route publishing with the bare PublisherClient.
- subscriber: messages/s through one streaming-pull subscriber that records then acks, against
  a callback that only acks, on two subscriptions of one topic holding the same messages.
- exporter: time of the first evaluation with 100,000 events (100,000 publish records and
  100,000 receipts) stored, against reading those 200,000 documents once with a bare find(),
  and the steady-state evaluation that follows.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from flask import Flask, jsonify, request
from google.cloud import pubsub_v1
from prometheus_client import CollectorRegistry

from eventaudit.contract import utc_now_ms
from eventaudit.exporter.buckets import Window
from eventaudit.exporter.evaluator import Evaluator
from eventaudit.exporter.subscriptions import ExpectedSubscriptions
from eventaudit.publisher.app import PublisherDeps, create_app
from eventaudit.publisher.audited import AuditedPublisher, PublisherMetrics, RecordBuffer
from eventaudit.publisher.config import PublisherSettings
from eventaudit.pubsub import publisher_client
from eventaudit.records import PublishRecord, Receipt
from eventaudit.store import MongoStore
from eventaudit.subscriber.audited import AuditedSubscriber, SubscriberMetrics
from tools import stack

PROJECT = "eventaudit-bench"


def _bare_app(topic: str) -> Flask:
    """The same route without auditing: publish with the bare client and wait for the id."""
    client = publisher_client()
    path = client.topic_path(PROJECT, topic)
    app = Flask("bare")

    @app.post("/api/v1/topics/<name>/events")
    def publish(name: str) -> Any:
        body = request.get_data()
        message_id = client.publish(path, body, eventID=str(uuid.uuid4())).result(timeout=30)
        return jsonify(messageId=message_id), 201

    return app


def _drive(app: Flask, topic: str, n: int, threads: int) -> float:
    """POST n events with `threads` concurrent clients; events/s."""
    client = app.test_client()
    url = f"/api/v1/topics/{topic}/events"

    def one(i: int) -> int:
        return client.post(url, json={"n": i, "name": "Zakk Wylde"}).status_code

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        codes = list(pool.map(one, range(n)))
    elapsed = time.perf_counter() - started
    assert codes.count(201) == n, f"{n - codes.count(201)} requests failed"
    return n / elapsed


def bench_publisher(store: MongoStore, n: int) -> None:
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    stack.create_topic(PROJECT, topic, [])
    registry = CollectorRegistry()
    metrics = PublisherMetrics(registry)
    buffer = RecordBuffer(store, metrics)
    buffer.start()
    audited = AuditedPublisher(publisher_client(), PROJECT, buffer, metrics)
    app = create_app(
        # 16 clients need 16 publish slots: threads - 2 (two stay free for /healthz, /metrics).
        PublisherSettings(project=PROJECT, threads=18),
        PublisherDeps(audited, buffer, registry),
    )
    bare = _bare_app(topic)
    _drive(bare, topic, 200, 16)  # warm both paths
    _drive(app, topic, 200, 16)
    rates: dict[str, list[float]] = {"bare": [], "audited": []}
    for _ in range(3):  # interleaved, so machine noise hits both alike
        rates["bare"].append(_drive(bare, topic, n, 16))
        started = time.perf_counter()
        rate = _drive(app, topic, n, 16)
        assert audited.flush(timeout=120)
        # Count the time until every record is durable, not just until the HTTP answers.
        rates["audited"].append(n / (time.perf_counter() - started) if rate else 0.0)
    buffer.close()
    stored = store.published.count_documents({"topic": topic})
    assert stored == 3 * n + 200, stored
    b, a = max(rates["bare"]), max(rates["audited"])
    print(f"publisher API  bare {b:8.0f} events/s   audited {a:8.0f} events/s   ratio {a / b:.2f}")


def bench_subscriber(store: MongoStore, n: int) -> None:
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    subs = [f"{topic}-bare", f"{topic}-audited"]
    stack.create_topic(PROJECT, topic, subs)
    client = publisher_client()
    path = client.topic_path(PROJECT, topic)
    now_ms = str(int(time.time() * 1000))
    futures = [
        client.publish(path, b'{"n":1}', eventID=str(uuid.uuid4()), publishTime=now_ms)
        for _ in range(n)
    ]
    for f in futures:
        f.result(timeout=60)

    def consume(sub: str, audited: bool) -> float:
        done = threading.Event()
        count = [0]
        lock = threading.Lock()

        def on_done() -> None:
            with lock:
                count[0] += 1
                if count[0] >= n:
                    done.set()

        if audited:
            metrics = SubscriberMetrics(CollectorRegistry(), sub)
            writer = AuditedSubscriber(store, sub, topic, metrics, on_receipt=lambda _r: on_done())
            writer.start()
            callback: Callable[[Any], None] = writer
        else:

            def ack_only(message: Any) -> None:
                message.ack()
                on_done()

            callback = ack_only

        with pubsub_v1.SubscriberClient() as sc:
            flow = pubsub_v1.types.FlowControl(max_messages=1000)
            started = time.perf_counter()
            future = sc.subscribe(sc.subscription_path(PROJECT, sub), callback, flow_control=flow)
            assert done.wait(300), f"{sub}: only {count[0]} of {n} messages"
            elapsed = time.perf_counter() - started
            future.cancel()
            with contextlib.suppress(Exception):
                future.result(timeout=10)
        if audited:
            writer.stop()
            assert store.received.count_documents({"subscription": sub}) == n
        return n / elapsed

    bare = consume(subs[0], audited=False)
    audited = consume(subs[1], audited=True)
    print(
        f"subscriber     bare {bare:8.0f} msgs/s     audited {audited:8.0f} msgs/s     "
        f"ratio {audited / bare:.2f}"
    )


def bench_exporter(store: MongoStore, n: int) -> None:
    topic, sub = "bench-exporter", "bench-exporter-sub"
    base = datetime.now(UTC) - timedelta(minutes=50)
    step = timedelta(minutes=45) / n
    for start in range(0, n, 5000):
        batch = range(start, min(n, start + 5000))
        when = [
            (base + step * i).replace(microsecond=(base + step * i).microsecond // 1000 * 1000)
            for i in batch
        ]
        store.insert_publish_records(
            [
                PublishRecord(f"evt-{i}", "t" * 32, topic, "{}", str(i), w)
                for i, w in zip(batch, when, strict=False)
            ],
            utc_now_ms(),
        )
        # 1 in 100 receipts is missing, 1 in 50 redelivered.
        store.record_receipts(
            [
                Receipt(sub, f"evt-{i}", topic, "t" * 32, str(i), w, w, w)
                for i, w in zip(batch, when, strict=False)
                if i % 100
            ]
            + [
                Receipt(sub, f"evt-{i}", topic, "t" * 32, str(i), w, w, w)
                for i, w in zip(batch, when, strict=False)
                if i % 50 == 1
            ],
            utc_now_ms(),
        )
    started = time.perf_counter()
    docs = sum(1 for _ in store.published.find({})) + sum(1 for _ in store.received.find({}))
    scan = time.perf_counter() - started

    expected = ExpectedSubscriptions({topic: {sub}}, set(), None)
    evaluator = Evaluator(
        store,
        expected,
        [Window.parse("1h", timedelta(seconds=10))],
        timedelta(seconds=10),
        timedelta(seconds=30),
    )
    # Evaluate as if the records were written a while ago (two buckets more than the late
    # lookback before the first evaluation): otherwise the next evaluation would take every
    # one of them for a late record and re-read the whole window, which is not the steady
    # state being measured.
    now = datetime.now(UTC) + timedelta(seconds=80)
    started = time.perf_counter()
    snapshot = evaluator.evaluate(now)
    first = time.perf_counter() - started
    stats = snapshot.subscriptions[(topic, sub)]["1h"]
    assert (stats.published, stats.missed) == (n, n // 100), (stats.published, stats.missed)
    started = time.perf_counter()
    evaluator.evaluate(now + timedelta(seconds=10))
    steady = time.perf_counter() - started
    print(
        f"exporter       {docs} docs: bare find {scan:.2f} s   first evaluation {first:.2f} s "
        f"(ratio {first / scan:.2f})   next evaluation {steady * 1000:.0f} ms "
        f"(ratio {steady / scan:.3f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("which", nargs="*", default=["publisher", "subscriber", "exporter"])
    parser.add_argument("--events", type=int, default=3000, help="events for publisher/subscriber")
    parser.add_argument("--records", type=int, default=100_000, help="stored events for exporter")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="eventaudit-bench-"))
    services = []
    try:
        fport, eport = stack.free_port(), stack.free_port()
        services.append(stack.ferretdb(fport, tmp / "ferret", tmp).start())
        services.append(stack.pubsub_emulator(eport, tmp).start())
        os.environ["PUBSUB_EMULATOR_HOST"] = f"127.0.0.1:{eport}"
        print(
            f"bench on {os.cpu_count()} cores; "
            "FerretDB (SQLite) and the Pub/Sub emulator on loopback"
        )
        for which in args.which:
            store = MongoStore(
                f"mongodb://127.0.0.1:{fport}/", f"bench_{which}", timeout_seconds=30
            )
            store.ensure_indexes()
            if which == "publisher":
                bench_publisher(store, args.events)
            elif which == "subscriber":
                bench_subscriber(store, args.events)
            else:
                bench_exporter(store, args.records)
            store.close()
    finally:
        for service in reversed(services):
            service.stop()


if __name__ == "__main__":
    main()
