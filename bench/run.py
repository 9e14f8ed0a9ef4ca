"""Benchmarks: each prints a ratio against a baseline measured in the same run.

    make bench                    # all three
    python -m bench.run publisher # one of: publisher, subscriber, exporter

- publisher: events/s through the publisher API with auditing (AuditedPublisher + record
  buffer into FerretDB) against the same Flask route publishing with the bare PublisherClient.
- subscriber: messages/s through one streaming-pull subscriber that records then acks, against
  a callback that only acks, on two subscriptions of one topic holding the same messages.
- exporter: with 10,000 and with 1,000,000 events stored (a publish record and receipts on two
  subscriptions each), the steady evaluation (100 new events per 10 s bucket), the first
  evaluation after a restart, a /metrics scrape and an /api/v1/missed listing, as ratios of
  much history to little; then a burst of 100,000 events folded at once (events/s, RSS).
- push: pushes/s answered by the audited push receiver (receipt stored before each 204, into
  FerretDB) against a bare Flask route that reads the envelope and answers 204, over HTTP, 16
  concurrent pushers each; once with endpoints that do nothing, once with endpoints whose work
  is one durable write of their own; and the store writes per message (group commit).
- replicas (not part of `make bench`'s default three): 30 topics with traffic in every 10 s
  bucket; the steady evaluation of one exporter without leases (the baseline), of one with
  leases (holding all 30 topics: the cost of leases and fencing), and of three replicas
  dividing the topics (each one's pass: folding a third, reading what the others stored).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import http.client
import json
import operator
import os
import shutil
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
from prometheus_client import CollectorRegistry, generate_latest
from pymongo import MongoClient

from eventaudit.contract import TraceContext, build_attributes, utc_now_ms
from eventaudit.exporter.buckets import Window
from eventaudit.exporter.collector import CompletionCollector, EvaluationState
from eventaudit.exporter.evaluator import Evaluator
from eventaudit.exporter.leases import Leases
from eventaudit.exporter.snapshot import list_missed
from eventaudit.exporter.subscriptions import ExpectedSubscriptions
from eventaudit.publisher.app import PublisherDeps, create_app
from eventaudit.publisher.audited import AuditedPublisher, PublisherMetrics, RecordBuffer
from eventaudit.publisher.config import PublisherSettings
from eventaudit.pubsub import publisher_client
from eventaudit.push.__main__ import create_app as create_push_app
from eventaudit.push.envelope import push_body
from eventaudit.push.receiver import PushReceiver
from eventaudit.records import PublishRecord, Receipt
from eventaudit.serving import BackgroundServer, ServerLimits
from eventaudit.store import MongoStore
from eventaudit.subscriber.audited import AuditedSubscriber, SubscriberMetrics
from tools import stack

PROJECT = "eventaudit-bench"


def bare_app(topic: str) -> Flask:
    """The same route without auditing: publish with the bare client and wait for the id."""
    client = publisher_client()
    path = client.topic_path(PROJECT, topic)
    app = Flask("bare")

    @app.post("/api/v1/topics/<name>/events")
    def publish(name: str) -> Any:
        body = request.get_data()
        message_id = client.publish(path, body, eventID=str(uuid.uuid4())).result(timeout=30)
        return jsonify(messageId=message_id), 201

    @app.get("/healthz")
    def healthz() -> Any:
        return jsonify(status="ok")

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
        # 16 publish slots (threads - 2) for 16 clients, as the bare route has no bound: with
        # the default 14, two clients would wait for a slot each turn (bench.burst measures that).
        PublisherSettings(project=PROJECT, threads=18),
        PublisherDeps(audited, buffer, registry),
    )
    bare = bare_app(topic)
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


def _envelope(subscription: str, i: int) -> bytes:
    attrs = build_attributes(f"push-{uuid.uuid4().hex}", utc_now_ms(), TraceContext.new())
    data = b'{"n": 1, "name": "Zakk Wylde"}'
    return push_body(PROJECT, subscription, str(i), datetime.now(UTC), data, attrs)


def bare_push_app(work: Callable[[bytes], None] = lambda _data: None) -> Flask:
    """A push endpoint without auditing: read the envelope, do `work`, answer 204."""
    app = Flask("bare-push")

    @app.post("/push")
    def push() -> Any:
        doc = json.loads(request.get_data())
        work(base64.b64decode(doc["message"].get("data", "")))
        return "", 204

    return app


PUSHERS = 16


class _CountingWrites(MongoStore):
    """MongoStore counting its receipt writes (store round-trips)."""

    writes = 0

    def record_receipts(self, receipts: Any, now: datetime) -> None:
        type(self).writes += 1
        super().record_receipts(receipts, now)


def bench_push(uri: str, n: int) -> None:
    """Twice: endpoints that do nothing, and endpoints whose work is one durable write of
    their own (an insert into another database of the same server), as real ones do."""
    client: MongoClient[dict[str, Any]] = MongoClient(uri, serverSelectionTimeoutMS=30_000)
    handled = client["bench_push_app"]["handled"]

    def own_write(data: bytes) -> None:
        handled.insert_one({"_id": uuid.uuid4().hex, "size": len(data)})

    for label, work in (("no work", None), ("one write of their own", own_write)):
        _bench_push(uri, n, label, work)
    client.close()


def _bench_push(uri: str, n: int, label: str, work: Callable[[bytes], None] | None) -> None:
    sub = f"bench-push-{uuid.uuid4().hex[:8]}"
    store = _CountingWrites(uri, "bench_push", timeout_seconds=30)
    registry = CollectorRegistry()
    handler = (lambda message: work(message.data)) if work is not None else None
    receiver = PushReceiver(store, {sub: "bench-push"}, registry, handler)
    receiver.start()
    # Over real HTTP, as Pub/Sub pushes: the same server (waitress, 16 threads) for both.
    limits = ServerLimits(threads=PUSHERS, max_body_bytes=2**24)
    apps = {
        "audited": create_push_app(receiver, registry, 2**24),
        "bare": bare_push_app(work) if work is not None else bare_push_app(),
    }
    servers = {
        name: BackgroundServer(app, f"127.0.0.1:{stack.free_port()}", limits)
        for name, app in apps.items()
    }
    for server in servers.values():
        server.start()

    def drive(which: str, count: int) -> float:
        port = servers[which].port
        bodies = [_envelope(sub, i) for i in range(count)]
        per = [bodies[k::PUSHERS] for k in range(PUSHERS)]

        def pusher(mine: list[bytes]) -> int:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            ok = 0
            for body in mine:  # one keep-alive connection per pusher
                conn.request("POST", "/push", body, {"Content-Type": "application/json"})
                answer = conn.getresponse()
                answer.read()
                ok += answer.status == 204
            conn.close()
            return ok

        started = time.perf_counter()
        with ThreadPoolExecutor(PUSHERS) as pool:
            ok = sum(pool.map(pusher, per))
        elapsed = time.perf_counter() - started
        assert ok == count, f"{count - ok} pushes refused"
        return count / elapsed

    drive("bare", 200)  # warm both
    drive("audited", 200)
    rates: dict[str, list[float]] = {"bare": [], "audited": []}
    writes, pushed = _CountingWrites.writes, 0
    for _ in range(3):  # interleaved, so machine noise hits both alike
        rates["bare"].append(drive("bare", n))
        rates["audited"].append(drive("audited", n))
        pushed += n
    per_write = pushed / (_CountingWrites.writes - writes)
    for server in servers.values():
        server.stop()
    receiver.stop()
    assert store.received.count_documents({"subscription": sub}) == 3 * n + 200
    store.close()
    b, a = max(rates["bare"]), max(rates["audited"])
    print(
        f"push ({label}) bare {b:6.0f} pushes/s   audited {a:6.0f} pushes/s   "
        f"ratio {a / b:.2f}; {per_write:.1f} receipts per store write ({PUSHERS} concurrent "
        "pushers over HTTP)"
    )


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


TOPIC, SUBS = "bench-exporter", ("bench-exporter-a", "bench-exporter-b")
WRITE_BATCH = 5000


def _ms(moment: datetime) -> datetime:
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def _write_events(store: MongoStore, times: list[datetime], prefix: str) -> None:
    """Publish records and receipts on two subscriptions through the writers (so the journal
    is written as in production): 1 in 100 missed on the first subscription, 1 in 50
    redelivered on the second."""
    for start in range(0, len(times), WRITE_BATCH):
        batch = list(enumerate(times[start : start + WRITE_BATCH], start))
        store.insert_publish_records(
            [PublishRecord(f"{prefix}{i}", "t" * 32, TOPIC, "{}", str(i), w) for i, w in batch],
            utc_now_ms(),
        )
        for sub, keep, twice in ((SUBS[0], 100, 0), (SUBS[1], 1, 50)):
            receipts = [
                Receipt(sub, f"{prefix}{i}", TOPIC, None, str(i), w, w, w)
                for i, w in batch
                if keep == 1 or i % keep
            ]
            receipts += [r for i, r in enumerate(receipts) if twice and i % twice == 1]
            store.record_receipts(receipts, utc_now_ms())


def _evaluator(store: MongoStore, monotonic: Callable[[], float] = time.monotonic) -> Evaluator:
    expected = ExpectedSubscriptions({TOPIC: set(SUBS)}, set(), None)
    return Evaluator(
        store,
        expected,
        [Window.parse(w, timedelta(seconds=10)) for w in ("1m", "5m", "1h")],
        timedelta(seconds=10),
        timedelta(seconds=30),
        budget=timedelta(hours=1),  # fold the whole history in one call
        monotonic=monotonic,
    )


def _p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


RECENT = 10_000  # events in the longest window, whatever the history


def _spread(n: int, newest: datetime, span: timedelta) -> list[datetime]:
    """`n` publish times evenly over `span` before `newest`, oldest first."""
    return [_ms(newest - span * (1 - i / n)) for i in range(n)]


def _exporter_case(store: MongoStore, stored: int, now: datetime) -> dict[str, float]:
    """`stored` events: the last hour holds RECENT of them in both cases, the rest is history
    of the 24 hours before, written and folded hour by hour as a running exporter would have
    (digests and results of every bucket stored). Then the steady state, 15 s later: 100 new
    events per 10 s bucket, 15 evaluations (the median is reported)."""
    started = time.perf_counter()
    older = stored - RECENT
    hours = 24
    for h in range(hours):
        end = now - timedelta(hours=hours - h)
        _write_events(store, _spread(older // hours, end, timedelta(hours=1)), f"o{h}-")
        _evaluator(store).evaluate(end + timedelta(minutes=1))
    written = _spread(RECENT, now - timedelta(minutes=2), timedelta(hours=1))
    _write_events(store, written, "h")
    _evaluator(store).evaluate(now)
    write = time.perf_counter() - started
    # A restart: the first evaluation of a new process reads the stored results only. Its
    # monotonic clock moves 10 s a pass, as a running exporter's does: the journal's
    # housekeeping (the straggler recount, the drop grace) goes by it, and with the real
    # clock 15 passes in a row would look like 15 passes within a second.
    monotonic = [time.monotonic()]
    started = time.perf_counter()
    ev = _evaluator(store, lambda: monotonic[0])
    ev.evaluate(now)
    restart = time.perf_counter() - started
    # Steady state, not the aftermath of the bulk load above: FerretDB checkpoints the
    # write-ahead log of the millions of records just written for a while after.
    time.sleep(15)
    steady = []
    for k in range(15):
        tick = now + timedelta(seconds=10 * (k + 1))
        new = _spread(100, tick - timedelta(seconds=35), timedelta(seconds=10))
        written += new
        _write_events(store, new, f"n{k}-")
        monotonic[0] += 10
        started = time.perf_counter()
        snapshot = ev.evaluate(tick)
        steady.append(time.perf_counter() - started)
    stats = snapshot.subscriptions[(TOPIC, SUBS[0])]["1h"]
    start = snapshot.frontier - timedelta(hours=1)
    assert stats.published == sum(1 for t in written if start <= t < snapshot.frontier), stats
    registry = CollectorRegistry()
    state = EvaluationState(settle_seconds=30)
    state.succeeded(snapshot, 0.0)
    registry.register(CompletionCollector(state))
    scrapes = []
    for _ in range(1000):
        started = time.perf_counter()
        generate_latest(registry)
        scrapes.append(time.perf_counter() - started)
    window = snapshot.window("1h")
    assert window is not None
    listings = []
    for _ in range(1000):
        started = time.perf_counter()
        listed = list_missed(snapshot, store, TOPIC, SUBS[0], window, 100)
        listings.append(time.perf_counter() - started)
    assert listed is not None and len(listed) == min(100, stats.missed), (len(listed or []), stats)
    docs = store.published.estimated_document_count() + store.received.estimated_document_count()
    return {
        "write": write,
        "docs": docs,
        "restart": restart,
        "steady": sorted(steady)[len(steady) // 2],
        "scrape_p99": _p99(scrapes),
        "missed_p99": _p99(listings),
    }


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (another one's: FerretDB's)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


REPLICA_TOPICS = [f"bench-topic-{i:02d}" for i in range(30)]


def _multi_topic_events(store: MongoStore, tick: datetime, k: int, per_topic: int) -> int:
    """`per_topic` events on each REPLICA_TOPICS topic published in the bucket that settles
    at `tick`, received on two subscriptions each; how many events."""
    when = [_ms(tick - timedelta(seconds=39) + timedelta(seconds=9 * i / per_topic))
            for i in range(per_topic)]  # fmt: skip
    records = [
        PublishRecord(f"{t}-{k}-{i}", "t" * 32, t, "{}", str(i), w)
        for t in REPLICA_TOPICS
        for i, w in enumerate(when)
    ]
    store.insert_publish_records(records, utc_now_ms())
    for sub in ("a", "b"):
        receipts = [
            Receipt(f"{r.topic}-{sub}", r.event_id, r.topic, None, "m", w, w, w)
            for r in records
            for w in (r.publish_time,)
        ]
        store.record_receipts(receipts, utc_now_ms())
    return len(records)


def _replica_group(store: MongoStore, n: int, clock: Callable[[], datetime]) -> list[Evaluator]:
    """`n` exporter replicas with leases (0: one without). Their monotonic clocks follow the
    virtual one: passes are a bucket apart, as in a running exporter."""
    group = []
    start = clock().timestamp()

    def monotonic() -> float:
        return clock().timestamp() - start

    for i in range(max(n, 1)):
        expected = ExpectedSubscriptions(
            {t: {f"{t}-a", f"{t}-b"} for t in REPLICA_TOPICS}, set(), None
        )
        leases = Leases(store, f"r{i}", timedelta(seconds=60), clock, monotonic) if n else None
        group.append(
            Evaluator(
                store,
                expected,
                [Window.parse(w, timedelta(seconds=10)) for w in ("1m", "5m", "1h")],
                timedelta(seconds=10),
                timedelta(seconds=30),
                monotonic=monotonic,
                leases=leases,
            )
        )
    return group


def bench_replicas(uri: str, per_topic: int = 20) -> None:
    """Steady evaluation per pass: no leases, one replica with leases, three replicas."""
    medians = {}
    for n in (0, 1, 3):
        store = MongoStore(uri, f"bench_replicas_{n}_{uuid.uuid4().hex[:6]}", timeout_seconds=60)
        start = datetime.now(UTC).replace(microsecond=0)
        now = [start - timedelta(seconds=start.second % 10)]  # buckets settle at each tick
        group = _replica_group(store, n, functools.partial(operator.itemgetter(0), now))
        passes: list[list[float]] = [[] for _ in group]
        for k in range(24):
            now[0] += timedelta(seconds=10)
            _multi_topic_events(store, now[0], k, per_topic)
            for i, ev in enumerate(group):
                started = time.perf_counter()
                snapshot = ev.evaluate(now[0])
                passes[i].append(time.perf_counter() - started)
        # Every replica serves every topic, all settled events counted.
        for t in REPLICA_TOPICS:
            assert snapshot.subscriptions[(t, f"{t}-a")]["1m"].published == 6 * per_topic, t
        steady = [sorted(p[-12:])[6] for p in passes]  # after the split has settled
        medians[n] = steady
        label = {0: "1 exporter, no leases", 1: "1 replica, leases", 3: "3 replicas"}[n]
        print(
            f"replicas {label:>22}: steady pass ({30 * per_topic} events per 10 s bucket, 30 "
            f"topics, 2 subscriptions each) {', '.join(f'{s * 1000:.0f}' for s in steady)} ms"
        )
        store.close()
    base, one, three = medians[0][0], medians[1][0], medians[3]
    print(
        f"replicas       ratios: leases / none {one / base:.2f}; busiest of 3 replicas / one "
        f"exporter {max(three) / base:.2f}; the 3 passes summed / one exporter "
        f"{sum(three) / base:.2f}"
    )


def bench_exporter(uri: str, sizes: list[int], ferret_pid: int) -> None:
    """Steady evaluation, scrape and /api/v1/missed with little and much history, and a burst."""
    now = datetime.now(UTC)
    results = {}
    for stored in sizes:
        store = MongoStore(uri, f"bench_exporter_{stored}", timeout_seconds=60)
        store.ping()
        results[stored] = _exporter_case(store, stored, now)
        r = results[stored]
        print(
            f"exporter {stored:>9} events stored ({r['docs']:.0f} records, written and folded "
            f"in {r['write']:.0f} s): first evaluation after a restart "
            f"{r['restart'] * 1000:.0f} ms; steady evaluation {r['steady'] * 1000:.0f} ms; "
            f"/metrics p99 {r['scrape_p99'] * 1000:.2f} ms; /api/v1/missed (100 events) p99 "
            f"{r['missed_p99'] * 1000:.1f} ms"
        )
        store.close()
    small, large = results[min(sizes)], results[max(sizes)]
    print(
        f"exporter       ratios {max(sizes)} / {min(sizes)} stored: steady evaluation "
        f"{large['steady'] / small['steady']:.2f}, /metrics p99 "
        f"{large['scrape_p99'] / small['scrape_p99']:.2f}, /api/v1/missed p99 "
        f"{large['missed_p99'] / small['missed_p99']:.2f}"
    )
    # A burst: 100,000 events written at once (a publisher flushing after an outage).
    store = MongoStore(uri, "bench_exporter_burst", timeout_seconds=60)
    store.ping()
    burst = [
        _ms(now - timedelta(seconds=40) - timedelta(minutes=5) * (i / 100_000))
        for i in range(100_000)
    ]
    _write_events(store, burst, "b")
    ev = _evaluator(store)
    rss = _rss_mb()
    started, cpu, ferret_cpu = time.perf_counter(), time.process_time(), _cpu_seconds(ferret_pid)
    ev.evaluate(now)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    ferret_cpu = _cpu_seconds(ferret_pid) - ferret_cpu
    print(
        f"exporter       burst of 100,000 events (300,000 journal entries): folded in "
        f"{elapsed:.1f} s, {100_000 / elapsed:,.0f} events/s; {100_000 / cpu:,.0f} per CPU "
        f"second of the exporter, {100_000 / (cpu + ferret_cpu):,.0f} counting FerretDB's too "
        f"({cpu:.1f} + {ferret_cpu:.1f} CPU s); exporter RSS {rss:.0f} -> {_rss_mb():.0f} MB"
    )
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("which", nargs="*", default=["publisher", "subscriber", "exporter"])
    parser.add_argument("--events", type=int, default=3000, help="events for publisher/subscriber")
    parser.add_argument(
        "--stored",
        default="10000,1000000",
        help="exporter: events of history to compare, comma-separated",
    )
    parser.add_argument(
        "--topic-rate",
        type=int,
        default=20,
        help="replicas: events per topic per 10 s bucket (30 topics)",
    )
    args = parser.parse_args()
    sizes = [int(x) for x in args.stored.split(",")]
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
            store.ping()
            if which == "publisher":
                bench_publisher(store, args.events)
            elif which == "subscriber":
                bench_subscriber(store, args.events)
            elif which == "push":
                bench_push(f"mongodb://127.0.0.1:{fport}/", args.events)
            elif which == "replicas":
                bench_replicas(f"mongodb://127.0.0.1:{fport}/", args.topic_rate)
            else:
                ferret = services[0].proc
                assert ferret is not None
                bench_exporter(f"mongodb://127.0.0.1:{fport}/", sizes, ferret.pid)
            store.close()
    finally:
        for service in reversed(services):
            service.stop()
        shutil.rmtree(tmp, ignore_errors=True)  # gigabytes with a million events stored


if __name__ == "__main__":
    main()
