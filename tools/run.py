"""`make run`: the whole stack on loopback with a steady trickle of traffic. Ctrl-C stops it.

FerretDB (SQLite) :27017, Pub/Sub emulator :8085, publisher API :3000, subscribers :9701 and
:9702 (the second loses 2% of events on purpose), the push receiver :9710 (the emulator pushes
`create-user-push` to it), exporter :9800, Prometheus :9090, Alertmanager :9093 (every port
shifted by `--port-offset`).

A child that dies is restarted (at most 5 times in 5 minutes, then the stack stops), saying
which one and the last lines of its log. Stopping follows the data: traffic, then the
publisher (which writes its buffered records), then the subscribers once they have handled
every published event (or after `--drain-seconds`), then the exporter, Prometheus and
Alertmanager, the emulator and the store last; so Ctrl-C during traffic loses no event.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tools import stack

PROJECT = "eventaudit-local"
TOPIC = "create-user"
SUBSCRIPTIONS = ("create-user-audit", "create-user-lossy")
PUSH_SUBSCRIPTION = "create-user-push"
SUBSCRIBED = {
    "subscriber-1": SUBSCRIPTIONS[0],
    "subscriber-2": SUBSCRIPTIONS[1],
    "push": PUSH_SUBSCRIPTION,
}
"""The services that receive events, and their subscription."""
PORTS = {
    "ferretdb": 27017,
    "pubsub-emulator": 8085,
    "publisher": 3000,
    "subscriber-1": 9701,
    "subscriber-2": 9702,
    "push": 9710,
    "exporter": 9800,
    "prometheus": 9090,
    "alertmanager": 9093,
}
# Subscriber outcomes after which the message was acked: what "handled" means when draining.
ACKED_OUTCOMES = ("recorded", "invalid", "internal_error_dropped", "fault_lost")
# The publisher flushes its record buffer on SIGTERM within its own shutdown budget.
PUBLISHER_STOP_SECONDS = 40.0
# A subscriber that dies holding messages leaves them leased for its stream ack deadline (the
# subscriber's --lease-extension-seconds, 10 s) before the emulator redelivers them; the
# emulator may go on handing messages to the dead stream for a few seconds after it died.
REDELIVERY_SECONDS = 25.0
# The second subscriber acks this fraction of events unrecorded, on purpose (the demo's loss).
LOSE_FRACTION = 0.02


def traffic(url: str, rate: float, stop: threading.Event, counts: dict[str, int]) -> None:
    """POST `url` `rate` times a second until stopped."""
    while not stop.wait(1 / rate):
        req = urllib.request.Request(url, data=b"", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                json.load(resp)
                counts["ok"] += 1
        except Exception as exc:  # any failure of one request (HTTP, truncated, not JSON)
            counts["failed"] += 1
            print(f"[run] traffic: {type(exc).__name__}: {exc}", file=sys.stderr)


def scrape(url: str) -> Samples | None:
    """Samples by metric name from a /metrics page; None when unreachable."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


Samples = dict[str, list[tuple[dict[str, str], float]]]


def sample_sum(samples: Samples | None, name: str, **labels: str | tuple[str, ...]) -> float:
    """Sum of the samples of `name` whose labels match (a tuple: any of its values)."""

    def match(have: dict[str, str]) -> bool:
        return all(have.get(k) in (v if isinstance(v, tuple) else (v,)) for k, v in labels.items())

    return sum(value for have, value in (samples or {}).get(name, []) if match(have))


def summary(exporter_url: str, window: str = "5m") -> str:
    """One line from the exporter: completion and missed per subscription over `window`."""
    samples = scrape(f"{exporter_url}/metrics")
    if samples is None:
        return "exporter unreachable"
    rates = {
        labels["subscription"]: value
        for labels, value in samples.get("eventaudit_completion_rate", [])
        if labels.get("window") == window
    }
    missed = {
        labels["subscription"]: value
        for labels, value in samples.get("eventaudit_missed_events", [])
        if labels.get("window") == window
    }
    if not rates:
        return "no evaluation yet"
    return f"{window}: " + ", ".join(
        f"{sub} {rate * 100:.2f}% ({missed.get(sub, 0):.0f} missed)"
        for sub, rate in sorted(rates.items())
    )


def handled(samples: Samples | None) -> tuple[float, float]:
    """(messages acked, receipts pending) from one subscriber's metrics."""
    if samples is None:
        return 0.0, float("inf")
    acked = sample_sum(samples, "eventaudit_subscriber_messages_total", outcome=ACKED_OUTCOMES)
    return acked, sample_sum(samples, "eventaudit_subscriber_pending_receipts")


def drained(published: float, acked: float, pending: float) -> bool:
    """A subscriber has handled every published event and holds nothing unwritten."""
    return acked >= published and pending == 0


@dataclass
class RestartPolicy:
    """At most `limit` restarts of one child within `period` seconds."""

    limit: int = 5
    period: float = 300.0
    times: deque[float] = field(default_factory=deque)

    def allow(self, now: float) -> bool:
        """Record a restart at `now` if allowed."""
        while self.times and now - self.times[0] > self.period:
            self.times.popleft()
        if len(self.times) >= self.limit:
            return False
        self.times.append(now)
        return True


@dataclass
class Child:
    """A started service, what to redo after restarting it, and its restart budget."""

    service: stack.Service
    after_start: Callable[[], None] = lambda: None
    policy: RestartPolicy = field(default_factory=RestartPolicy)


def offset_prometheus_config(source: Path, target: Path, ports: dict[str, int]) -> Path:
    """prometheus.yml with its loopback targets moved to `ports` and absolute rule paths."""
    text = source.read_text()
    for name, port in PORTS.items():
        text = text.replace(f'127.0.0.1:{port}"', f'127.0.0.1:{ports[name]}"')
    for rules in ("rules.yml", "alerts.yml"):
        text = text.replace(f"- {rules}", f"- {source.parent / rules}")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return target


class Stack:
    """Starts, watches and stops the services of `make run`."""

    def __init__(self, data: Path, ports: dict[str, int], drain_seconds: float) -> None:
        self.data = data
        self.logs = data / "logs"
        self.ports = ports
        self.drain_seconds = drain_seconds
        self.children: dict[str, Child] = {}
        self.restarted: dict[str, float] = {}  # name -> monotonic time of the last restart
        self.started_at = datetime.now(UTC) - timedelta(seconds=1)
        self.env = {
            "PUBSUB_EMULATOR_HOST": f"127.0.0.1:{ports['pubsub-emulator']}",
            "EVENTAUDIT_PROJECT": PROJECT,
            "EVENTAUDIT_MONGO_URI": f"mongodb://127.0.0.1:{ports['ferretdb']}/",
        }
        os.environ.update(self.env)

    def url(self, name: str) -> str:
        """http://127.0.0.1:PORT of a service."""
        return f"http://127.0.0.1:{self.ports[name]}"

    def _start(self, service: stack.Service, after_start: Callable[[], None] | None = None) -> None:
        print(f"[run] starting {service.name} (log: {service.log_path})")
        child = Child(service, after_start or (lambda: None))
        self.children[service.name] = child
        try:
            service.start()
        finally:
            self.save_state()
        child.after_start()

    def save_state(self) -> None:
        """Write who runs (this process and each child) for `make stop` in another terminal."""
        pids = {
            n: _identity(c.service.proc.pid) for n, c in self.children.items() if c.service.proc
        }
        write_state(self.data, {"run": _identity(os.getpid()), "children": pids})

    def _create_topic(self) -> None:
        push = {PUSH_SUBSCRIPTION: f"{self.url('push')}/push"}
        stack.create_topic(PROJECT, TOPIC, SUBSCRIPTIONS, push)
        print(
            f"[run] topic {TOPIC} with subscriptions {', '.join(SUBSCRIPTIONS)} and "
            f"{PUSH_SUBSCRIPTION} (pushed to {push[PUSH_SUBSCRIPTION]})"
        )

    def start(self) -> None:
        """Start every service in dependency order; raises ServiceError or OSError."""
        ports, logs, env = self.ports, self.logs, self.env
        self._start(stack.ferretdb(ports["ferretdb"], self.data / "ferretdb", logs))
        self._start(stack.pubsub_emulator(ports["pubsub-emulator"], logs), self._create_topic)
        self._start(
            stack.python_service(
                "publisher",
                "publisher",
                ["--listen-address", f"127.0.0.1:{ports['publisher']}"],
                logs,
                env,
                f"{self.url('publisher')}/healthz",
                stop_timeout=PUBLISHER_STOP_SECONDS,
            )
        )
        for i, (sub, extra) in enumerate(
            zip(SUBSCRIPTIONS, ([], ["--lose-fraction", str(LOSE_FRACTION)]), strict=True), start=1
        ):
            name = f"subscriber-{i}"
            self._start(
                stack.python_service(
                    name,
                    "subscriber",
                    ["--subscription", sub, "--listen-address", f"127.0.0.1:{ports[name]}", *extra],
                    logs,
                    env,
                    f"{self.url(name)}/metrics",
                    stop_timeout=30,
                )
            )
        self._start(
            stack.python_service(
                "push",
                "push",
                [
                    "--subscriptions",
                    PUSH_SUBSCRIPTION,
                    "--listen-address",
                    f"127.0.0.1:{ports['push']}",
                ],
                logs,
                env,
                f"{self.url('push')}/healthz",
                stop_timeout=30,
            )
        )
        self._start(
            stack.python_service(
                "exporter",
                "exporter",
                ["--listen-address", f"127.0.0.1:{ports['exporter']}"],
                logs,
                env,
                f"{self.url('exporter')}/metrics",
                stop_timeout=40,
            )
        )
        prom = stack.ROOT / "prometheus"
        self._start(
            stack.alertmanager(
                prom / "alertmanager.yml", ports["alertmanager"], self.data / "am", logs
            )
        )
        config = offset_prometheus_config(
            prom / "prometheus.yml", self.data / "prometheus.yml", ports
        )
        self._start(stack.prometheus(config, ports["prometheus"], self.data / "prom", logs))

    def restart_dead(self) -> bool:
        """Restart children that exited; False when one exceeded its restart budget."""
        for name, child in self.children.items():
            service = child.service
            if service.running():
                continue
            code = service.proc.returncode if service.proc else None
            last = service.tail(3).replace("\n", "\n        ")
            print(f"[run] {name} exited with {code}; last log lines:\n        {last}")
            if not child.policy.allow(time.monotonic()):
                print(
                    f"[run] {name} died {child.policy.limit} times in "
                    f"{child.policy.period:g}s; stopping (log: {service.log_path})",
                    file=sys.stderr,
                )
                return False
            print(f"[run] restarting {name}")
            self.restarted[name] = time.monotonic()
            try:
                service.start()
                child.after_start()
            except (stack.ServiceError, OSError) as exc:
                print(f"[run] could not restart {name}: {exc}", file=sys.stderr)
            finally:
                self.save_state()
        return True

    def stop(self) -> None:
        """Stop in data-flow order (see the module docstring)."""
        publisher = self.children.pop("publisher", None)
        if publisher is not None:
            # Read its count first: its /metrics goes away with it.
            samples = scrape(f"{self.url('publisher')}/metrics")
            published = sample_sum(
                samples, "eventaudit_publisher_events_total", outcome="published"
            )
            publisher.service.stop()
            self.drain_after_publisher(published)
        for name in in_stop_order([n for n in self.children if n != "publisher"]):
            child = self.children.pop(name, None)
            if child is not None:
                child.service.stop()
        state_path(self.data).unlink(missing_ok=True)

    def drain_after_publisher(self, published: float) -> None:
        """Wait, bounded, until each subscriber has handled every published event.

        Normally from the metrics: a subscriber has acked at least what the publisher
        published. A subscriber restarted during the run counts only what it handled since
        (and after a publisher restart the publisher's count is partial), and the emulator may
        go on handing messages to a dead stream for a while; then from the records: every
        event published during this run has a receipt on the subscription, except those its
        fault knob drops on purpose.
        """
        subscribers = [n for n in self.children if n in SUBSCRIBED]
        by_records = {
            n for n in subscribers if n in self.restarted or "publisher" in self.restarted
        }
        store = self._store() if by_records else None  # one connection for the whole drain
        expected = self._expected_receipts(store) if store is not None else {}
        start = time.monotonic()
        deadline = start + self.drain_seconds + (REDELIVERY_SECONDS if by_records else 0)
        waiting = subscribers
        while True:
            still = []
            for name in waiting:
                if store is not None and name in by_records:
                    done = self._receipts(store, name) >= expected.get(name, 0)
                else:
                    done = drained(published, *handled(scrape(f"{self.url(name)}/metrics")))
                if not done:
                    still.append(name)
            waiting = still
            if not waiting or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if store is not None:
            store.close()
        if waiting:
            print(
                f"[run] {', '.join(waiting)} had not handled all {published:.0f} published "
                f"events after {time.monotonic() - start:.0f}s; stopping anyway"
            )
        else:
            print(f"[run] every subscription drained ({published:.0f} events published)")

    def _store(self) -> Any:
        from eventaudit.store import MongoStore

        return MongoStore(self.env["EVENTAUDIT_MONGO_URI"], "eventaudit", timeout_seconds=5)

    def _expected_receipts(self, store: Any) -> dict[str, int]:
        """Per subscriber, the receipts this run's published events should leave."""
        from eventaudit.subscriber.audited import Faults

        query = {"topic": TOPIC, "publishTime": {"$gte": self.started_at}}
        ids = [d["eventID"] for d in store.published.find(query, {"eventID": 1})]
        lossy = Faults.lose_fraction(LOSE_FRACTION).lose
        return {
            "subscriber-1": len(ids),
            "subscriber-2": sum(1 for event_id in ids if not lossy(event_id)),
            "push": len(ids),
        }

    def _receipts(self, store: Any, name: str) -> int:
        """Receipts stored for a subscriber's subscription, of events published this run."""
        subscription = SUBSCRIBED[name]
        try:
            return int(
                store.received.count_documents(
                    {"subscription": subscription, "publishTime": {"$gte": self.started_at}}
                )
            )
        except Exception as exc:  # the store is the one thing that must still answer
            print(f"[run] cannot count receipts of {subscription}: {exc}", file=sys.stderr)
            return -1


def state_path(data: Path) -> Path:
    """Where a running `make run` says who it is."""
    return data / "stack.json"


def write_state(data: Path, state: dict[str, object]) -> None:
    """Atomically replace the state file."""
    data.mkdir(parents=True, exist_ok=True)
    tmp = state_path(data).with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(state_path(data))


def process_start(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a live, non-zombie process; None otherwise.

    (pid, start time) names one process: a pid alone may have been reused since a state
    file was written (after a reboot, say), and `make stop` must never signal a stranger.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def _identity(pid: int) -> list[int]:
    return [pid, process_start(pid) or 0]


def alive(identity: list[int]) -> bool:
    """True while the process named by [pid, start time] still runs."""
    pid, started = identity
    return started != 0 and process_start(pid) == started


STOP_ORDER = (
    "publisher",
    "subscriber-1",
    "subscriber-2",
    "push",
    "exporter",
    "prometheus",
    "alertmanager",
    "pubsub-emulator",
    "ferretdb",
)
"""Data-flow order: what writes first (it writes what it buffers), what stores last."""


def in_stop_order(names: list[str]) -> list[str]:
    """`names` in STOP_ORDER, unknown ones before the emulator and the store."""
    rank = {name: i for i, name in enumerate(STOP_ORDER)}
    unknown = rank["pubsub-emulator"] - 0.5
    return sorted(names, key=lambda n: rank.get(n, unknown))


def stop_running(data: Path, timeout: float = 240.0, drain_seconds: float = 5.0) -> int:
    """`make stop`: stop the stack a `make run` in another terminal started (or say none runs).

    SIGTERM to `make run` stops everything in data-flow order; if `make run` itself is gone
    (killed), its children are stopped directly. Exit 0 when nothing is left running.
    """
    path = state_path(data)
    try:
        state = json.loads(path.read_text())
        run = [int(x) for x in state["run"]]
        children = {str(k): [int(x) for x in v] for k, v in dict(state["children"]).items()}
    except FileNotFoundError:
        print(f"[stop] nothing runs (no make run state in {data})")
        return 0
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"[stop] unreadable state file {path}: {exc}", file=sys.stderr)
        return 1
    if not alive(run) and not any(alive(c) for c in children.values()):
        path.unlink(missing_ok=True)
        print("[stop] nothing runs (stale state removed)")
        return 0
    if alive(run):
        print(f"[stop] stopping make run (pid {run[0]}); it stops the services in order")
        os.kill(run[0], signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while alive(run) and time.monotonic() < deadline:
            time.sleep(0.2)
        if alive(run):
            print(f"[stop] make run did not stop in {timeout:g}s: killing it", file=sys.stderr)
            os.kill(run[0], signal.SIGKILL)
    # Left behind by a make run that was killed: stopped in data-flow order too, the publisher
    # first (it writes its buffered records), then after a pause for the subscribers to take
    # what it published (issue 17, case 13: in start order the store went first).
    for name in in_stop_order(list(children)):
        child = children[name]
        if alive(child):
            print(f"[stop] stopping leftover {name} (pid {child[0]})")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child[0], signal.SIGTERM)
            deadline = time.monotonic() + 30
            while alive(child) and time.monotonic() < deadline:
                time.sleep(0.2)
            if alive(child):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child[0], signal.SIGKILL)
            if name == "publisher":
                time.sleep(drain_seconds)
    time.sleep(0.2)
    left = [name for name, child in children.items() if alive(child)]
    if left:
        print(f"[stop] still running: {', '.join(left)}", file=sys.stderr)
        return 1
    path.unlink(missing_ok=True)
    print("[stop] stopped; nothing left running")
    return 0


def _ascii_int(text: str) -> int:
    """argparse type: an integer in ASCII digits, optionally negative (int() takes other
    scripts' digits too)."""
    if not re.fullmatch(r"-?[0-9]{1,9}", text):
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}")
    return int(text)


def _ascii_number(text: str) -> float:
    """argparse type: a decimal number in ASCII digits (no nan, inf or exponents)."""
    if not re.fullmatch(r"[0-9]{1,9}(\.[0-9]{1,9})?", text):
        raise argparse.ArgumentTypeError(f"not a number: {text!r}")
    return float(text)


def main(argv: list[str] | None = None) -> int:
    """Start everything, print where to look, stop everything on Ctrl-C (or after --duration)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=_ascii_number, default=20.0, help="requests per second")
    parser.add_argument(
        "--duration", type=_ascii_number, default=0, help="stop after N seconds (0: never)"
    )
    parser.add_argument("--data-dir", default="data/run", help="FerretDB, Prometheus data and logs")
    parser.add_argument("--port-offset", type=_ascii_int, default=0, help="shift every port by N")
    parser.add_argument(
        "--drain-seconds",
        type=_ascii_number,
        default=45.0,
        help="longest wait for subscribers at stop",
    )
    parser.add_argument(
        "--stop", action="store_true", help="stop the stack a make run elsewhere started"
    )
    args = parser.parse_args(argv)
    if not 0 < args.rate <= 10_000:
        parser.error("--rate must be in (0, 10000]")
    if not all(0 < port + args.port_offset < 65536 for port in PORTS.values()):
        parser.error(
            f"--port-offset must keep every port in 1..65535 (ports {sorted(PORTS.values())})"
        )
    data = (stack.ROOT / args.data_dir).resolve()
    if args.stop:
        return stop_running(data)

    ports = {name: port + args.port_offset for name, port in PORTS.items()}
    busy = [f"{name} :{port}" for name, port in ports.items() if stack.port_open(port)]
    if busy:
        print(
            f"[run] ports already in use: {', '.join(busy)}; stop what holds them", file=sys.stderr
        )
        return 1
    run = Stack(data, ports, args.drain_seconds)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # Ctrl-C stops the stack even when SIGINT came in ignored (a shell's background job
    # without job control): Python then installs no handler of its own.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        run.start()
    except (stack.ServiceError, OSError, KeyboardInterrupt) as exc:
        # Ctrl-C during start-up too: children run in their own sessions, stop them here.
        print(f"[run] {exc or 'interrupted'}", file=sys.stderr)
        run.stop()
        return 1

    counts = {"ok": 0, "failed": 0}
    sender = threading.Thread(
        target=traffic,
        args=(f"{run.url('publisher')}/api/v1/users", args.rate, stop, counts),
        daemon=True,
    )
    sender.start()
    exporter = run.url("exporter")
    print(
        f"""
[run] eventaudit is running, with up to {args.rate:g} requests/s of traffic. Look at:
        curl {exporter}/metrics          exporter (completion, missed; numbers after ~40 s)
        {exporter}/               status page
        curl '{exporter}/api/v1/missed?topic={TOPIC}&subscription={SUBSCRIPTIONS[1]}&window=5m'
        curl -X POST {run.url("publisher")}/api/v1/users
        {run.url("prometheus")}/               Prometheus (alerts: /alerts)
      {SUBSCRIPTIONS[1]} loses 2% of events on purpose. Ctrl-C stops everything.
"""
    )
    deadline = time.monotonic() + args.duration if args.duration else float("inf")
    next_summary = time.monotonic() + 45
    code = 0
    try:
        while not stop.wait(1):
            if time.monotonic() > deadline:
                break
            if time.monotonic() > next_summary:
                sent = f"sent {counts['ok']}, failed {counts['failed']}"
                print(f"[run] {summary(exporter)}  ({sent})")
                next_summary += 30
            if not run.restart_dead():
                code = 1
                break
    except KeyboardInterrupt:
        pass
    stop.set()
    sender.join(timeout=10)
    print(f"\n[run] stopping ({counts['ok']} requests sent, {counts['failed']} failed)")
    try:
        run.stop()
    except KeyboardInterrupt:  # a second Ctrl-C: stop the rest at once
        for child in run.children.values():
            child.service.kill()
        print("[run] killed what was left")
        return 130
    print("[run] stopped; nothing left running")
    return code


if __name__ == "__main__":
    sys.exit(main())
