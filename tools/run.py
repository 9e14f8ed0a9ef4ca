"""`make run`: the whole stack on loopback with a steady trickle of traffic. Ctrl-C stops it.

FerretDB (SQLite) :27017, Pub/Sub emulator :8085, publisher API :3000, subscribers :9701 and
:9702 (the second loses 2% of events on purpose), exporter :9800, Prometheus :9090,
Alertmanager :9093.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import urllib.request

from tools import stack

PROJECT = "eventaudit-local"
TOPIC = "create-user"
SUBSCRIPTIONS = ("create-user-audit", "create-user-lossy")
PORTS = {
    "ferretdb": 27017,
    "pubsub-emulator": 8085,
    "publisher": 3000,
    "subscriber-1": 9701,
    "subscriber-2": 9702,
    "exporter": 9800,
    "prometheus": 9090,
    "alertmanager": 9093,
}


def traffic(rate: float, stop: threading.Event, counts: dict[str, int]) -> None:
    """POST /api/v1/users `rate` times a second until stopped."""
    url = f"http://127.0.0.1:{PORTS['publisher']}/api/v1/users"
    while not stop.wait(1 / rate):
        req = urllib.request.Request(url, data=b"", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                json.load(resp)
                counts["ok"] += 1
        except OSError as exc:
            counts["failed"] += 1
            print(f"[run] traffic: {exc}", file=sys.stderr)


def summary(window: str = "5m") -> str:
    """One line from the exporter: completion and missed per subscription over `window`."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{PORTS['exporter']}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
    except OSError as exc:
        return f"exporter unreachable: {exc}"
    rates: dict[str, float] = {}
    missed: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("window") != window:
                continue
            if sample.name == "eventaudit_completion_rate":
                rates[sample.labels["subscription"]] = sample.value
            elif sample.name == "eventaudit_missed_events":
                missed[sample.labels["subscription"]] = sample.value
    if not rates:
        return "no evaluation yet"
    return f"{window}: " + ", ".join(
        f"{sub} {rate * 100:.2f}% ({missed.get(sub, 0):.0f} missed)"
        for sub, rate in sorted(rates.items())
    )


def main() -> int:
    """Start everything, print where to look, stop everything on Ctrl-C (or after --duration)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=0, help="stop after N seconds (0: never)")
    parser.add_argument("--data-dir", default="data/run", help="FerretDB, Prometheus data and logs")
    args = parser.parse_args()

    busy = [f"{name} :{port}" for name, port in PORTS.items() if stack.port_open(port)]
    if busy:
        print(
            f"[run] ports already in use: {', '.join(busy)}; stop what holds them", file=sys.stderr
        )
        return 1
    data = stack.ROOT / args.data_dir
    logs = data / "logs"
    env = {
        "PUBSUB_EMULATOR_HOST": f"127.0.0.1:{PORTS['pubsub-emulator']}",
        "EVENTAUDIT_PROJECT": PROJECT,
        "EVENTAUDIT_MONGO_URI": f"mongodb://127.0.0.1:{PORTS['ferretdb']}/",
    }
    os.environ.update(env)
    started: list[stack.Service] = []
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def start(service: stack.Service) -> None:
        print(f"[run] starting {service.name} (log: {service.log_path.relative_to(stack.ROOT)})")
        started.append(service.start())

    try:
        start(stack.ferretdb(PORTS["ferretdb"], data / "ferretdb", logs))
        start(stack.pubsub_emulator(PORTS["pubsub-emulator"], logs))
        stack.create_topic(PROJECT, TOPIC, SUBSCRIPTIONS)
        print(f"[run] topic {TOPIC} with subscriptions {', '.join(SUBSCRIPTIONS)}")
        start(
            stack.python_service(
                "publisher",
                "publisher",
                [],
                logs,
                env,
                f"http://127.0.0.1:{PORTS['publisher']}/healthz",
            )
        )
        for i, (sub, extra) in enumerate(
            zip(SUBSCRIPTIONS, ([], ["--lose-fraction", "0.02"]), strict=True), start=1
        ):
            port = PORTS[f"subscriber-{i}"]
            start(
                stack.python_service(
                    f"subscriber-{i}",
                    "subscriber",
                    ["--subscription", sub, "--listen-address", f"127.0.0.1:{port}", *extra],
                    logs,
                    env,
                    f"http://127.0.0.1:{port}/metrics",
                )
            )
        start(
            stack.python_service(
                "exporter",
                "exporter",
                [],
                logs,
                env,
                f"http://127.0.0.1:{PORTS['exporter']}/metrics",
            )
        )
        prom = stack.ROOT / "prometheus"
        start(
            stack.alertmanager(prom / "alertmanager.yml", PORTS["alertmanager"], data / "am", logs)
        )
        start(stack.prometheus(prom / "prometheus.yml", PORTS["prometheus"], data / "prom", logs))
    except (stack.ServiceError, OSError, KeyboardInterrupt) as exc:
        # Ctrl-C during start-up too: children run in their own sessions, stop them here.
        print(f"[run] {exc or 'interrupted'}", file=sys.stderr)
        for service in reversed(started):
            service.stop()
        return 1

    counts = {"ok": 0, "failed": 0}
    sender = threading.Thread(target=traffic, args=(args.rate, stop, counts), daemon=True)
    sender.start()
    print(
        f"""
[run] eventaudit is running, with up to {args.rate:g} requests/s of traffic. Look at:
        curl localhost:9800/metrics          exporter (completion, missed; numbers after ~40 s)
        http://localhost:9800/               status page
        curl 'localhost:9800/api/v1/missed?topic={TOPIC}&subscription={SUBSCRIPTIONS[1]}&window=5m'
        curl -X POST localhost:3000/api/v1/users
        http://localhost:9090/               Prometheus (alerts: /alerts)
      {SUBSCRIPTIONS[1]} loses 2% of events on purpose. Ctrl-C stops everything.
"""
    )
    deadline = time.monotonic() + args.duration if args.duration else float("inf")
    next_summary = time.monotonic() + 45
    try:
        while not stop.wait(1):
            if time.monotonic() > deadline:
                break
            if time.monotonic() > next_summary:
                print(f"[run] {summary()}  (sent {counts['ok']}, failed {counts['failed']})")
                next_summary += 30
            dead = [s.name for s in started if not s.running()]
            if dead:
                print(f"[run] {', '.join(dead)} exited; see {logs}", file=sys.stderr)
                break
    except KeyboardInterrupt:
        pass
    stop.set()
    print(f"\n[run] stopping ({counts['ok']} requests sent, {counts['failed']} failed)")
    for service in reversed(started):
        service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
