"""A burst on the publisher API: concurrent clients posting as fast as they are answered.

    python -m bench.burst                        # 16 clients x 60,000 events, own stack
    python -m bench.burst --events 4000          # a short run while iterating
    python -m bench.burst --url http://127.0.0.1:3000   # against a running `make run`

With its own stack (as `make run` starts them: FerretDB, the Pub/Sub emulator with the topic
create-user and make run's two subscriptions, nobody pulling), it runs the burst twice, each
on its own process with 16 waitress threads:

- bare: the same route publishing with the bare PublisherClient and waiting for the message id
  (no audit, no publish slots), the baseline;
- publisher: `python -m eventaudit.publisher` with its default settings.

Each client keeps one HTTP connection and posts `POST /api/v1/topics/create-user/events`
until the events are shared out. It prints, for each: events/s, answers other than 201 (503:
refused), latency p50/p99; for the publisher its `refused_total{reason="busy"}` and that every
accepted event's publish record was written; and the ratio publisher/bare. The issue's goal
(issue 19, item 7): 0 refused with the default settings while Pub/Sub and the store are
healthy. Against `--url` it runs the publisher burst alone (make run's traffic goes on beside it).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tools import stack

PROJECT = "eventaudit-bench"
TOPIC = "create-user"
SUBSCRIPTIONS = ("create-user-audit", "create-user-lossy")


@dataclass
class Burst:
    """What the clients saw."""

    seconds: float = 0.0
    statuses: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    bodies: dict[int, str] = field(default_factory=dict)  # one answer of each other status

    @property
    def accepted(self) -> int:
        return self.statuses[201]

    def quantile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def burst(base: str, clients: int, events: int) -> Burst:
    """`events` POSTs shared out among `clients` threads, each on one keep-alive connection."""
    url = urllib.parse.urlsplit(base)
    result = Burst()
    lock = threading.Lock()
    shares = [events // clients + (1 if i < events % clients else 0) for i in range(clients)]
    start = threading.Barrier(clients + 1)

    def client(n: int) -> None:
        conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=120)
        statuses: Counter[int] = Counter()
        latencies: list[float] = []
        bodies: dict[int, str] = {}
        start.wait()
        try:
            for i in range(n):
                body = json.dumps({"n": i, "name": "Zakk Wylde", "burst": True})
                began = time.perf_counter()
                try:
                    conn.request(
                        "POST",
                        f"/api/v1/topics/{TOPIC}/events",
                        body,
                        {"Content-Type": "application/json"},
                    )
                    resp = conn.getresponse()
                    answer = resp.read()
                    status = resp.status
                except (OSError, http.client.HTTPException) as exc:
                    conn.close()  # reconnects on the next request
                    status, answer = 0, repr(exc).encode()
                latencies.append(time.perf_counter() - began)
                statuses[status] += 1
                if status != 201:
                    bodies.setdefault(status, answer.decode(errors="replace").strip()[:200])
        finally:
            conn.close()
            with lock:
                result.statuses.update(statuses)
                result.latencies.extend(latencies)
                for status, text in bodies.items():
                    result.bodies.setdefault(status, text)

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in shares]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    result.seconds = time.perf_counter() - began
    return result


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(base: str) -> Samples:
    """Every sample on /metrics, by name and labels."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def report(name: str, result: Burst) -> None:
    others = {s: c for s, c in sorted(result.statuses.items()) if s != 201}
    print(
        f"{name:9}  {result.accepted / result.seconds:7.0f} events/s   "
        f"{result.accepted} accepted, {result.statuses[503]} refused (503), "
        f"other answers {others or 'none'}   latency p50 {result.quantile(0.5) * 1000:.1f} ms, "
        f"p99 {result.quantile(0.99) * 1000:.1f} ms   ({result.seconds:.1f} s)"
    )
    for status, text in result.bodies.items():
        print(f"           e.g. {status}: {text}")


def publisher_burst(base: str, clients: int, events: int, check_records: bool) -> Burst:
    """The burst on the audited publisher, with its own counters before and after."""
    before = scrape(base)
    result = burst(base, clients, events)
    report("publisher", result)
    after = scrape(base)
    refused = "eventaudit_publisher_refused_total"
    busy = sample(after, refused, reason="busy") - sample(before, refused, reason="busy")
    print(f"           refused_total{{reason=busy}} +{busy:.0f}")
    if check_records:
        records = "eventaudit_publisher_records_total"

        def gained(outcome: str, now: Samples) -> float:
            return sample(now, records, outcome=outcome) - sample(before, records, outcome=outcome)

        deadline = time.monotonic() + 120
        now = scrape(base)
        while gained("written", now) < result.accepted and time.monotonic() < deadline:
            time.sleep(0.5)
            now = scrape(base)
        print(
            f"           publish records written {gained('written', now):.0f} of "
            f"{result.accepted}, dropped {gained('dropped', now):.0f}"
        )
    return result


def serve_bare(port: int) -> None:
    """The baseline's process: the route with the bare client, on waitress with 16 threads."""
    from bench.run import bare_app
    from eventaudit.serving import BackgroundServer, ServerLimits, serve_until_signal

    app = bare_app(TOPIC)
    server = BackgroundServer(app, f"127.0.0.1:{port}", ServerLimits(threads=16))
    serve_until_signal(server)
    server.stop(timeout=5)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--events", type=int, default=60_000, help="in all, per burst")
    parser.add_argument("--url", help="a running publisher API (make run: http://127.0.0.1:3000)")
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        serve_bare(args.serve_bare)
        return
    print(f"{args.clients} clients, {args.events} events per burst")
    if args.url:
        publisher_burst(args.url.rstrip("/"), args.clients, args.events, check_records=False)
        return
    tmp = Path(tempfile.mkdtemp(prefix="eventaudit-burst-"))
    services: list[stack.Service] = []
    try:
        fport, eport = stack.free_port(), stack.free_port()
        services.append(stack.ferretdb(fport, tmp / "ferret", tmp).start())
        services.append(stack.pubsub_emulator(eport, tmp).start())
        env = {
            "PUBSUB_EMULATOR_HOST": f"127.0.0.1:{eport}",
            "EVENTAUDIT_PROJECT": PROJECT,
            "EVENTAUDIT_MONGO_URI": f"mongodb://127.0.0.1:{fport}/",
        }
        os.environ.update(env)
        stack.create_topic(PROJECT, TOPIC, SUBSCRIPTIONS)
        bport, pport = stack.free_port(), stack.free_port()
        bare = f"http://127.0.0.1:{bport}"
        publisher = f"http://127.0.0.1:{pport}"
        python = str(stack.PYTHON) if stack.PYTHON.exists() else sys.executable
        services.append(
            stack.Service(
                "bare",
                [python, "-m", "bench.burst", "--serve-bare", str(bport)],
                tmp,
                env=env,
                ready=lambda: stack.http_ok(f"{bare}/healthz"),
            ).start()
        )
        services.append(
            stack.python_service(
                "publisher",
                "publisher",
                ["--listen-address", f"127.0.0.1:{pport}"],  # every other setting at its default
                tmp,
                env,
                f"{publisher}/healthz",
            ).start()
        )
        warm = min(1000, args.events)
        burst(bare, args.clients, warm)
        burst(publisher, args.clients, warm)
        base = burst(bare, args.clients, args.events)
        report("bare", base)
        audited = publisher_burst(publisher, args.clients, args.events, check_records=True)
        ratio = (audited.accepted / audited.seconds) / (base.accepted / base.seconds)
        print(f"ratio publisher/bare {ratio:.2f} (events/s accepted)")
    finally:
        for service in reversed(services):
            service.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
