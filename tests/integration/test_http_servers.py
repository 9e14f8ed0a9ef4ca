"""The services' HTTP servers and process lifecycle, on real processes (`python -m ...`).

Slow and idle clients, hostile HTTP framing answered in JSON, SIGKILL and SIGTERM of the
publisher, start-up failures. All traffic goes to loopback, every client loop is bounded in
count and time and stops by itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from eventaudit.store import MongoStore
from tests.conftest import Ferret, service_env, unique, wait_for
from tests.integration.http_client import metric as _metric
from tests.integration.http_client import post as _post
from tests.integration.http_client import timed_get as _get
from tools import stack

SERVICES = ("publisher", "subscriber", "exporter")


def _start(
    module: str, args: list[str], tmp_path: Path, env: dict[str, str], port: int
) -> stack.Service:
    return stack.python_service(
        module,
        module,
        ["--listen-address", f"127.0.0.1:{port}", *args],
        tmp_path,
        env,
        f"http://127.0.0.1:{port}/healthz",
    ).start()


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _process_group(pgid: int) -> list[int]:
    """Live processes whose process group is `pgid`."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may contain spaces and parentheses.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members


@dataclass
class Trio:
    topic: str
    sub: str
    ports: dict[str, int]
    procs: dict[str, stack.Service] = field(default_factory=dict)

    def url(self, name: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}{path}"


@pytest.fixture
def trio(ferret: Ferret, emulator: str, topic_factory, tmp_path: Path) -> Iterator[Trio]:
    """Publisher, subscriber and exporter with their default HTTP limits."""
    topic, (sub,) = topic_factory(1)
    env = service_env(ferret, emulator)
    t = Trio(topic, sub, {name: stack.free_port() for name in SERVICES})
    args = {
        "publisher": ["--users-topic", topic],
        "subscriber": ["--subscription", sub],
        "exporter": [
            "--bucket",
            "1s",
            "--settle-delay",
            "2s",
            "--windows",
            "1m",
            "--topics",
            topic,
        ],
    }
    try:
        for name in SERVICES:
            t.procs[name] = _start(name, args[name], tmp_path, env, t.ports[name])
        yield t
    finally:
        for proc in reversed(t.procs.values()):
            proc.stop(timeout=30)


class SlowClients:
    """`per_port` connections to each port, each sending the next byte of a request every
    `interval` seconds, `rounds` times; a thread of its own, stopped by `with` at the latest."""

    REQUEST = b"POST /api/v1/users HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n"

    def __init__(self, ports: list[int], per_port: int, interval: float, rounds: int) -> None:
        assert rounds < len(self.REQUEST)  # the request is never complete
        self.socks = [
            socket.create_connection(("127.0.0.1", port), timeout=5)
            for port in ports
            for _ in range(per_port)
        ]
        self.interval, self.rounds = interval, rounds
        self.sent_rounds = 0
        self.send_errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for i in range(self.rounds):
            if self._stop.wait(self.interval if i else 0):
                return
            for s in self.socks:
                try:
                    s.send(self.REQUEST[i : i + 1])
                except OSError:
                    self.send_errors += 1
            self.sent_rounds = i + 1

    def running(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> SlowClients:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for s in self.socks:
            s.close()


# The latency bound is the requirement itself (issue 6 item 3): while slow clients hold
# connections, health checks and scrapes must still answer in time. Answers take a few
# milliseconds here; 1 s leaves room for a busy 2-core machine, and gunicorn (16 threads)
# failed it outright, with time-outs.
LATENCY_BOUND_SECONDS = 1.0


def test_fifty_slow_clients_per_service_do_not_starve_health_or_metrics(trio: Trio) -> None:
    urls = [trio.url(n, p) for n in SERVICES for p in ("/healthz", "/metrics")]
    worst: dict[str, float] = dict.fromkeys(urls, 0.0)
    failures: list[str] = []
    # 50 per service, a byte every 2 s for 16 s: the publisher had 16 threads, the exporter 8.
    with SlowClients(list(trio.ports.values()), per_port=50, interval=2.0, rounds=8) as slow:
        while slow.running():
            for url in urls:
                status, body, took = _get(url)
                worst[url] = max(worst[url], took)
                if status != 200:
                    failures.append(f"{url}: {status} {body[:200]!r}")
            time.sleep(0.25)
        assert slow.sent_rounds == 8 and slow.send_errors == 0
    assert failures == []
    slowest = max(worst.values())
    assert slowest < LATENCY_BOUND_SECONDS, worst


def test_800_idle_connections_cost_no_thread_and_health_still_answers(trio: Trio) -> None:
    for name in SERVICES:
        proc = trio.procs[name].proc
        assert proc is not None
        threads_before, files_before = _threads(proc.pid), _open_files(proc.pid)

        def accepted(pid: int = proc.pid, files: int = files_before) -> bool:
            return _open_files(pid) >= files + 800

        conns = [
            socket.create_connection(("127.0.0.1", trio.ports[name]), timeout=5) for _ in range(800)
        ]
        try:
            wait_for(accepted, 20, f"the {name} to accept 800 connections")
            threads_after = _threads(proc.pid)
            status, body, _ = _get(trio.url(name, "/healthz"))
            assert status == 200, body
        finally:
            for c in conns:
                c.close()
        # waitress holds waiting connections in its event loop: a fixed pool of threads.
        assert threads_after - threads_before <= 2, (name, threads_before, threads_after)


def test_sigkill_of_the_publisher_leaves_no_process_and_its_port_free(
    ferret: Ferret, emulator: str, topic_factory, tmp_path: Path
) -> None:
    topic, _ = topic_factory(1)
    env = service_env(ferret, emulator)
    port = stack.free_port()
    proc = _start("publisher", ["--users-topic", topic], tmp_path, env, port)
    assert proc.proc is not None
    pid = proc.proc.pid
    status, _ = _post(f"http://127.0.0.1:{port}/api/v1/users")
    assert status == 200
    os.kill(pid, signal.SIGKILL)  # the process alone, not its group
    proc.proc.wait(5)
    assert _process_group(pid) == []
    with socket.socket() as s:  # bindable at once, as a restart binds it (SO_REUSEADDR)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
    again = _start("publisher", ["--users-topic", topic], tmp_path, env, port)
    try:
        assert _post(f"http://127.0.0.1:{port}/api/v1/users")[0] == 200
    finally:
        again.stop(timeout=30)
    assert again.proc is not None and again.proc.returncode == 0, again.tail()


_STOPPED = re.compile(
    r"publisher stopped: (\d+) publish records written, (\d+) dropped, (\d+) conflicting"
)


def test_sigterm_with_the_store_frozen_stops_within_budget_and_counts_every_record(
    private_ferret: Ferret, emulator: str, topic_factory, tmp_path: Path
) -> None:
    topic, _ = topic_factory(1)
    database = unique("db").replace("-", "_")
    env = service_env(private_ferret, emulator, database)
    port = stack.free_port()
    budget = 8.0
    args = [
        "--users-topic", topic,
        "--shutdown-timeout-seconds", str(budget),
        "--store-timeout-seconds", "1",
    ]  # fmt: skip
    proc = _start("publisher", args, tmp_path, env, port)
    assert proc.proc is not None
    base = f"http://127.0.0.1:{port}"
    written_ids = [_post(f"{base}/api/v1/users")[1]["metadata"]["eventID"] for _ in range(20)]
    wait_for(
        lambda: (
            _metric(f"{base}/metrics", "eventaudit_publisher_records_total", {"outcome": "written"})
            == 20
        ),
        20,
        "20 records written",
    )
    assert private_ferret.service.proc is not None
    ferret_pid = private_ferret.service.proc.pid
    os.kill(ferret_pid, signal.SIGSTOP)
    try:
        for _ in range(30):
            status, body = _post(f"{base}/api/v1/users")
            assert status == 200, body
        wait_for(
            lambda: json.loads(_get(f"{base}/healthz")[1])["recordBuffer"] == 30,
            10,
            "30 records in the buffer",
        )
        started = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        proc.proc.wait(budget + 10)
        took = time.monotonic() - started
    finally:
        os.kill(ferret_pid, signal.SIGCONT)
        proc.stop()
    log = proc.log_path.read_text()
    assert proc.proc.returncode == 0, proc.tail()
    # The budget is the process's own promise; the interpreter's exit adds well under 1 s.
    assert took < budget + 1.0, (took, proc.tail())
    stopped = _STOPPED.search(log)
    assert stopped is not None, proc.tail()
    written, dropped, conflicting = map(int, stopped.groups())
    # Nothing lost silently: every accepted record is counted written or dropped.
    assert (written, dropped, conflicting) == (20, 30, 0), proc.tail()
    store = MongoStore(private_ferret.uri, database)
    try:
        stored = {d["eventID"] for d in store.published.find({"topic": topic})}
    finally:
        store.close()
    assert set(written_ids) <= stored


@pytest.fixture
def strict_publisher(
    ferret: Ferret, emulator: str, topic_factory, tmp_path: Path
) -> Iterator[tuple[int, str]]:
    """A publisher that times out a request not received within 2 s."""
    topic, _ = topic_factory(1)
    port = stack.free_port()
    proc = _start(
        "publisher",
        ["--users-topic", topic, "--http-request-timeout-seconds", "2"],
        tmp_path,
        service_env(ferret, emulator),
        port,
    )
    try:
        yield port, topic
    finally:
        proc.stop(timeout=30)
    assert proc.proc is not None and proc.proc.returncode == 0, proc.tail()


def _raw(port: int, data: bytes, stall: bool = False, wait: float = 10.0) -> bytes:
    """Send `data` on a fresh connection (then keep it open without sending when `stall`)
    and read the answer until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        with contextlib.suppress(OSError):  # the server may answer before it read everything
            s.sendall(data)
        if not stall:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_WR)
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := s.recv(65_536):
                answer += chunk
    return answer


def _parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def _chunked(path: str, chunks: list[bytes], extra: bytes = b"") -> bytes:
    head = b"POST %s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n%s\r\n" % (
        path.encode(),
        extra,
    )
    return head + b"".join(chunks)


def _chunk(data: bytes, ext: bytes = b"") -> bytes:
    return b"%x%s\r\n%s\r\n" % (len(data), ext, data)


LIMIT = 1_048_576  # the publisher's default --max-body-bytes
EVENTS = "/api/v1/topics/{topic}/events"
GOOD = b'{"chunked": "ok"}'
BIG = [_chunk(b'{"chunked":"truncated"')] + [_chunk(b" " * 65_536) for _ in range(24)]
END = b"0\r\n\r\n"


def _post_head(path: str, *headers: str) -> bytes:
    return "".join(
        f"{line}\r\n" for line in (f"POST {path} HTTP/1.1", "Host: x", *headers, "")
    ).encode()


def _get_head(*headers: str, target: str = "/healthz") -> bytes:
    return "".join(
        f"{line}\r\n" for line in (f"GET {target} HTTP/1.1", "Host: x", *headers, "")
    ).encode()


CL_INVALID = "Content-Length is invalid"
BAD_SIZE = "Invalid chunk size"
TOO_SLOW = "within 2s"
OVER = f"limit of {LIMIT} bytes"
HEADERS_OVER = "limit of 32768 bytes"


def _with_raw_header(path: str, name: bytes, value: bytes) -> bytes:
    """A POST of GOOD whose header `name` carries `value` as raw bytes."""
    head = _post_head(path, f"Content-Length: {len(GOOD)}")[:-2]
    return head + name + b": " + value + b"\r\n\r\n" + GOOD


# (name, request for a path, stall after sending, status, fragment of the JSON error)
HOSTILE: list[tuple[str, Callable[[str], bytes], bool, int, str]] = [
    (
        "attributes not UTF-8",
        lambda p: _with_raw_header(p, b"X-Event-Attributes", b'{"k": "\xff"}'),
        False,
        400,
        "X-Event-Attributes: not UTF-8",
    ),
    (
        "ordering key not UTF-8",
        lambda p: _with_raw_header(p, b"X-Ordering-Key", b"k\xc3"),
        False,
        400,
        "X-Ordering-Key: not UTF-8",
    ),
    ("chunked body over the limit", lambda p: _chunked(p, [*BIG, END]), False, 413, OVER),
    ("chunked over the limit, no end", lambda p: _chunked(p, BIG), False, 413, OVER),
    ("chunk size not hex", lambda p: _chunked(p, [b"zz\r\nhello\r\n", END]), False, 400, BAD_SIZE),
    (
        "chunk size in fullwidth digits",
        lambda p: _chunked(p, ["\uff11\r\nh\r\n".encode(), END]),
        False,
        400,
        BAD_SIZE,
    ),
    ("negative chunk size", lambda p: _chunked(p, [b"-5\r\nhello\r\n", END]), False, 400, BAD_SIZE),
    ("chunk size with 0x", lambda p: _chunked(p, [b"0x5\r\nhello\r\n", END]), False, 400, BAD_SIZE),
    (
        "chunk size with a newline",
        lambda p: _chunked(p, [b"5\n\r\nhello\r\n", END]),
        False,
        400,
        BAD_SIZE,
    ),
    (
        "chunk extension with a newline",
        lambda p: _chunked(p, [_chunk(GOOD, b";a\n"), END]),
        False,
        400,
        "chunk extension",
    ),
    (
        "control byte in a chunk extension",
        lambda p: _chunked(p, [_chunk(GOOD, b";\x01"), END]),
        False,
        400,
        "chunk extension",
    ),
    (
        "chunk longer than its size",
        lambda p: _chunked(p, [b"5\r\nhelloXX\r\n", END]),
        False,
        400,
        "not properly terminated",
    ),
    (
        "huge chunk size, then nothing",
        lambda p: _chunked(p, [b"FFFFFFFFFFFFFFFFFFFF\r\nab"]),
        True,
        408,
        TOO_SLOW,
    ),
    (
        "body shorter than Content-Length, then nothing",
        lambda p: _post_head(p, "Content-Length: 100") + b"{}",
        True,
        408,
        TOO_SLOW,
    ),
    ("headers never finished", lambda p: b"POST / HTTP/1.1\r\nHost: x\r\n", True, 408, TOO_SLOW),
    (
        "Content-Length over the limit",
        lambda p: _post_head(p, f"Content-Length: {LIMIT + 1}"),
        False,
        413,
        OVER,
    ),
    (
        "over the limit, Expect: 100-continue",
        lambda p: _post_head(p, "Expect: 100-continue", "Content-Length: 99999999"),
        True,
        413,
        OVER,
    ),
    (
        "400-digit Content-Length",
        lambda p: _post_head(p, f"Content-Length: {'9' * 400}"),
        False,
        413,
        OVER,
    ),
    (
        "two Content-Lengths",
        lambda p: _post_head(p, "Content-Length: 2", "Content-Length: 2") + b"{}",
        False,
        400,
        CL_INVALID,
    ),
    (
        "Content-Length not a number",
        lambda p: _post_head(p, "Content-Length: abc"),
        False,
        400,
        CL_INVALID,
    ),
    (
        "negative Content-Length",
        lambda p: _post_head(p, "Content-Length: -1"),
        False,
        400,
        CL_INVALID,
    ),
    (
        "Content-Length with a sign",
        lambda p: _post_head(p, "Content-Length: +2") + b"{}",
        False,
        400,
        CL_INVALID,
    ),
    (
        "Content-Length in Arabic-Indic digits",
        lambda p: _post_head(p, "Content-Length: \u0662") + b"{}",
        False,
        400,
        CL_INVALID,
    ),
    (
        "Content-Length in superscript",
        lambda p: _post_head(p, "Content-Length: \u00b2") + b"{}",
        False,
        400,
        CL_INVALID,
    ),
    (
        "Transfer-Encoding gzip",
        lambda p: _post_head(p, "Transfer-Encoding: gzip"),
        False,
        501,
        "not supported",
    ),
    (
        "Transfer-Encoding chunked, gzip",
        lambda p: _post_head(p, "Transfer-Encoding: chunked, gzip"),
        False,
        501,
        "not supported",
    ),
    (
        "one header over the limit",
        lambda p: _get_head(f"X-Big: {'a' * 40_000}"),
        False,
        431,
        HEADERS_OVER,
    ),
    (
        "headers over the limit in all",
        lambda p: _get_head(*(f"X-{i}: {'b' * 40}" for i in range(1000))),
        False,
        431,
        HEADERS_OVER,
    ),
    (
        "URL over the limit",
        lambda p: _get_head(target=f"/healthz?{'a' * 9000}"),
        False,
        414,
        "limit of 8192 bytes",
    ),
    ("request line not HTTP", lambda p: b"GARBAGE\r\n\r\n", False, 400, "Start line is invalid"),
    (
        "lower-case method",
        lambda p: _post_head(p).replace(b"POST", b"post"),
        False,
        400,
        "Malformed HTTP method",
    ),
    ("bare LF inside a header", lambda p: _get_head("X-A: a\nX-B: b"), False, 400, "Bare CR or LF"),
    ("header without a colon", lambda p: _get_head("X-A b"), False, 400, "Invalid header"),
    ("NUL in a header value", lambda p: _get_head("X-A: a\x00b"), False, 400, "Invalid header"),
    (
        "first header folded",
        lambda p: b"GET /healthz HTTP/1.1\r\n Host: x\r\n\r\n",
        False,
        400,
        "Malformed header line",
    ),
    (
        "absolute URL, broken IPv6 host",
        lambda p: _get_head(target="http://[bad/healthz"),
        False,
        400,
        "Bad URI",
    ),
]

# Valid framing that must still publish: (name, request for a path) -> 201.
ACCEPTED: list[tuple[str, Callable[[str], bytes]]] = [
    (
        "chunked body within the limit",
        lambda p: _chunked(p, [_chunk(GOOD[:5]), _chunk(GOOD[5:]), END]),
    ),
    ("chunk extensions", lambda p: _chunked(p, [_chunk(GOOD, b";name=value;flag"), END])),
    ("chunked with a trailer", lambda p: _chunked(p, [_chunk(GOOD), b"0\r\nX-Trailer: 1\r\n\r\n"])),
    (
        "Content-Length and chunked: chunked wins",
        lambda p: _chunked(p, [_chunk(GOOD), END], b"Content-Length: 3\r\n"),
    ),
    (
        "body of exactly the limit",
        lambda p: _post_head(p, f"Content-Length: {LIMIT}") + GOOD + b" " * (LIMIT - len(GOOD)),
    ),
]


def test_hostile_http_framing_is_answered_json_and_publishes_nothing(strict_publisher) -> None:
    port, topic = strict_publisher
    path = EVENTS.format(topic=topic)
    wrong = []
    for name, request, stall, status, fragment in HOSTILE:
        answer = _raw(port, request(path), stall=stall)
        got, headers, body = _parse(answer)
        try:
            error = json.loads(body)
        except ValueError:
            error = {"unparsed": body[:200].decode("latin-1")}
        ok = (
            got == status
            and headers.get("content-type") == "application/json"
            and error.get("status") == status
            and fragment in str(error.get("error"))
            and b"100 Continue" not in answer
        )
        if not ok:
            wrong.append(f"{name}: {got} {error}")
    assert wrong == []

    for name, request in ACCEPTED:
        got, _, body = _parse(_raw(port, request(path)))
        assert got == 201, (name, body[:300])
        assert json.loads(body)["topic"] == topic
    # Raw UTF-8 in a header is read as UTF-8 (it was Latin-1: '{"Ã¼ber":"ja"}').
    options = '{"über":"ja"}'
    got, _, body = _parse(_raw(port, _with_raw_header(path, b"X-Event-Options", options.encode())))
    assert (got, json.loads(body)["metadata"]["Options"]) == (201, options)
    metrics = f"http://127.0.0.1:{port}/metrics"
    published = _metric(metrics, "eventaudit_publisher_events_total", {"outcome": "published"})
    assert published == len(ACCEPTED) + 1
    assert _get(f"http://127.0.0.1:{port}/healthz")[0] == 200


@pytest.mark.parametrize("module", ["publisher", "exporter"])
@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--mongo-uri", "notamongo://x"], "--mongo-uri: Value error, invalid MongoDB URI"),
        (["--mongo-uri", "mongodb://[bad"], "--mongo-uri: Value error, invalid MongoDB URI"),
        ([], "cannot start: OSError: [Errno 98] Address already in use"),
        # Flags taken only as typed (issue 18): these started, then every write failed.
        (["--project", "Bad Project"], "--project: Value error, not a Google Cloud project id"),
        (["--database", "d" * 200], "--database: Value error, a database name is 1 to 63"),
        (["--threads", " 8"], "--threads: Value error, must be printable"),
        (["--threads=8\n"], "--threads: Value error, must be printable"),
    ],
)
def test_start_up_failure_is_one_line_and_exit_1(
    module: str, argv: list[str], line: str, ferret: Ferret, emulator: str
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        command = [str(stack.PYTHON), "-m", f"eventaudit.{module}"]
        result = subprocess.run(
            [*command, "--listen-address", f"127.0.0.1:{port}", *argv],
            env={**os.environ, **service_env(ferret, emulator)},
            cwd=stack.ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert [x for x in result.stderr.splitlines() if line in x], result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2, result.stderr


def test_an_empty_window_is_a_usage_error_of_the_exporter(ferret: Ferret, emulator: str) -> None:
    result = subprocess.run(
        [str(stack.PYTHON), "-m", "eventaudit.exporter", "--windows", "1m,,5m"],
        env={**os.environ, **service_env(ferret, emulator)},
        cwd=stack.ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stderr.splitlines()) == (
        1,
        [
            "ExporterSettings: 1 invalid setting(s):",
            "  --windows: Value error, empty item in the comma-separated list",
        ],
    )
