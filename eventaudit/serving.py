"""Serve a WSGI app with waitress in the service's own process.

waitress reads and buffers each whole request in one event loop and hands only complete
requests to a fixed pool of threads, so a client that trickles bytes costs a socket, not a
thread. On top of it this module adds what a service facing hostile clients needs:

- a deadline for receiving one whole request (waitress only times out *idle* connections, so
  a client sending a byte every few seconds would otherwise hold its connection for ever);
- JSON `{"error", "status"}` answers for the errors the HTTP server raises itself (bad framing,
  header or target too long, body over the limit, request too slow);
- a graceful stop: stop accepting, let requests in progress finish within a timeout, close.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import resource
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from waitress import receiver, rfc7230
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser, ParsingError
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher
from waitress.utilities import BadRequest, Error, RequestEntityTooLarge
from waitress.wasyncore import dispatcher as wasyncore_dispatcher
from waitress.wasyncore import poll2

from eventaudit.contract import parse_ascii_int

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 32_768
"""Request line plus headers; more is answered 431."""
MAX_TARGET_BYTES = 8_192
"""Request target (path and query); longer is answered 414."""
# waitress matches chunk sizes and extensions with `^...$`, and `$` also matches before a
# trailing newline: "5\n" would be read as chunk size 5. Full matches instead.
receiver.ONLY_HEXDIG_RE = re.compile(f"{rfc7230.HEXDIG}+\\Z".encode("latin-1"))
receiver.CHUNK_EXT_RE = re.compile(f"{rfc7230.CHUNK_EXT}\\Z".encode("latin-1"))

_LINGER_SECONDS = 2.0
_TICK_SECONDS = 1.0
_DRAIN_TICK_SECONDS = 0.05
_FDS_PER_CONNECTION = 2  # the socket, and a spool file for a body over waitress's 512 KiB
_FDS_RESERVED = 256  # the store's and Pub/Sub's connections, logs, the interpreter


def parse_listen_address(address: str) -> tuple[str, int]:
    """Split `HOST:PORT` or `[IPV6]:PORT` (port 1-65535, ASCII digits), raising ValueError."""
    host, sep, port_text = address.rpartition(":")
    port = parse_ascii_int(port_text, max_digits=5)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        bad_host = not host or ":" not in host
    else:
        bad_host = not host or ":" in host
    if (
        not sep
        or bad_host
        or any(c.isspace() or not c.isprintable() or c in "[]/" for c in host)
        or port is None
        or not 0 < port < 65536
    ):
        raise ValueError(f"listen address must be HOST:PORT, got {address!r}")
    return host, port


@dataclass(frozen=True)
class ServerLimits:
    """What one HTTP server may spend, and how long it waits for a client."""

    threads: int = 4
    """Requests handled at once; waiting connections cost no thread."""
    connection_limit: int = 1000
    """Open connections; past it new ones wait in the kernel's backlog."""
    request_timeout_seconds: float = 30.0
    """From a request's first byte to its last: slower is answered 408 and closed."""
    idle_timeout_seconds: float = 30.0
    """A connection with no traffic for this long and no request being handled is closed."""
    max_body_bytes: int = 65_536
    """Largest request body as sent (chunk framing counts); more is answered 413."""


class RequestTimeout(Error):
    """The client did not send the whole request within the deadline."""

    code = 408
    reason = "Request Timeout"


class URITooLong(BadRequest):
    """The request target is over MAX_TARGET_BYTES."""

    code = 414
    reason = "URI Too Long"


class _Parser(HTTPRequestParser):
    """waitress's parser, plus the target length limit."""

    error: Error | None

    def parse_header(self, header_plus: bytes) -> None:
        try:
            super().parse_header(header_plus)
        except ValueError as exc:  # urlsplit("http://[bad/"): waitress lets it close the socket
            raise ParsingError(f"Bad URI: {exc}") from None

    def received(self, data: bytes) -> int:
        consumed: int = super().received(data)
        if (
            self.headers_finished
            and self.error is None
            and len(getattr(self, "request_uri", "")) > MAX_TARGET_BYTES
        ):
            self.error = URITooLong(f"request target over {MAX_TARGET_BYTES} bytes")
            self.completed = True
        return consumed


def _error_message(error: Error, limits: ServerLimits) -> str:
    if isinstance(error, RequestEntityTooLarge):
        return f"request body exceeds the limit of {limits.max_body_bytes} bytes"
    if error.code == 431:
        return f"request line and headers exceed the limit of {MAX_HEADER_BYTES} bytes"
    if isinstance(error, URITooLong):
        return f"request target exceeds the limit of {MAX_TARGET_BYTES} bytes"
    if isinstance(error, RequestTimeout):
        return f"request not received within {limits.request_timeout_seconds:g}s"
    if error.code >= 500 and error.code != 501:
        return "internal error"
    # waitress's reason ("Invalid chunk size", "Content-Length is invalid", ...) may quote
    # the client's bytes: JSON escapes them, and a bound keeps the answer small.
    text = str(error.body)
    return text if len(text) <= 200 else text[:200] + "..."


class _JSONErrorTask(ErrorTask):
    """Answers an error waitress raised while reading a request as JSON, and closes."""

    def execute(self) -> None:
        error: Error = self.request.error
        limits: ServerLimits = self.channel.server.limits
        message = _error_message(error, limits)
        body = json.dumps({"error": message, "status": error.code}).encode()
        log.info("HTTP %d to %s: %s", error.code, self.channel.addr, message)
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.channel.linger_on_close = True
        self.content_length = len(body)
        self.write(body)


class _Channel(HTTPChannel):
    """One connection; remembers when the request being received began, and closes gently
    after an error answer."""

    parser_class = _Parser
    error_task_class = _JSONErrorTask
    request: _Parser | None
    request_started = 0.0
    linger_on_close = False
    linger_until = 0.0

    def received(self, data: bytes) -> bool:
        if self.request is None:
            self.request_started = time.monotonic()
        return bool(super().received(data))

    def send_continue(self) -> None:
        # waitress would send "100 Continue" for a request it already rejected (Content-Length
        # over the limit) and reset it to incomplete, inviting the body instead of the 413.
        if self.request is not None and self.request.error is not None:
            return
        super().send_continue()

    def time_out_request(self, seconds: float) -> None:
        """Answer the request still being received 408 (in a worker thread), then close."""
        with self.requests_lock:
            if self.requests or self.request is None or self.will_close:
                return
            request, self.request = self.request, None
            request.error = RequestTimeout(f"not received within {seconds:g}s")
            request.completed = True
            self.requests.append(request)
            self.server.add_task(self)

    def readable(self) -> bool:
        return bool(self.linger_until) or bool(super().readable())

    def writable(self) -> bool:
        return not self.linger_until and bool(super().writable())

    def handle_read(self) -> None:
        if not self.linger_until:
            super().handle_read()
            return
        try:
            data = self.socket.recv(65_536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.stop_lingering()

    def handle_close(self) -> None:
        # After an error answer the client may still be sending (a body over the limit):
        # closing with unread input sends a reset, which can destroy the answer before the
        # client reads it. So stop writing, read and discard for a moment, then close
        # (nginx's lingering close).
        if self.linger_on_close and not self.linger_until and self.connected:
            try:
                self.socket.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            else:
                self.linger_until = time.monotonic() + _LINGER_SECONDS
                return
        super().handle_close()

    def stop_lingering(self) -> None:
        """Close a connection that lingered after an error answer."""
        self.linger_until = 0.0
        self.linger_on_close = False
        super().handle_close()


class _Server(TcpWSGIServer):
    """One listening socket, whose periodic maintenance also enforces the request deadline."""

    channel_class = _Channel

    def __init__(self, limits: ServerLimits, *args: Any, **kwargs: Any) -> None:
        self.limits = limits
        super().__init__(*args, **kwargs)

    def maintenance(self, now: float) -> None:
        try:
            mono = time.monotonic()
            cutoff = mono - self.limits.request_timeout_seconds
            for channel in list(self.active_channels.values()):
                if channel.linger_until and channel.linger_until < mono:
                    channel.stop_lingering()
                elif channel.request is not None and channel.request_started < cutoff:
                    channel.time_out_request(self.limits.request_timeout_seconds)
            super().maintenance(now)  # idle connections (waitress's channel_timeout)
        except Exception:  # the event loop must outlive any bug here
            log.exception("HTTP server maintenance failed")


def _connection_limit(wanted: int) -> int:
    """`wanted`, or fewer if the process cannot open that many files (raising the soft limit
    to the hard one first): past the file limit, accept() fails on every loop turn."""
    needed = wanted * _FDS_PER_CONNECTION + _FDS_RESERVED
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit to %d: %s", target, exc)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return wanted
    limit = max(1, (soft - _FDS_RESERVED) // _FDS_PER_CONNECTION)
    log.warning("open-file limit %d allows %d HTTP connections, not %d", soft, limit, wanted)
    return limit


class BackgroundServer:
    """A waitress server on `address`, bound at construction, served by a thread of its own.

    `stop(timeout)` stops accepting, waits up to `timeout` for the requests in progress, then
    closes every connection.
    """

    def __init__(self, app: Callable[..., Any], address: str, limits: ServerLimits | None = None):
        host, port = parse_listen_address(address)
        self.limits = limits or ServerLimits()
        adjustments = Adjustments(
            host=host,
            port=port,
            threads=self.limits.threads,
            connection_limit=_connection_limit(self.limits.connection_limit),
            channel_timeout=max(1, math.ceil(self.limits.idle_timeout_seconds)),
            cleanup_interval=1,
            max_request_header_size=MAX_HEADER_BYTES,
            # waitress answers 413 at `>=`; the limit itself is allowed.
            max_request_body_size=self.limits.max_body_bytes + 1,
            asyncore_use_poll=True,  # select() cannot watch descriptors past 1023
            expose_tracebacks=False,
            ident="eventaudit",
        )
        self._map: dict[int, Any] = {}
        self._dispatcher = ThreadedTaskDispatcher()
        self._servers = [
            _Server(
                self.limits,
                app,
                map=self._map,
                dispatcher=self._dispatcher,
                adj=adjustments,
                sockinfo=sockinfo,
            )
            for sockinfo in adjustments.listen
        ]
        self._draining = False
        self._closing = False
        self._drained = threading.Event()
        self._thread = threading.Thread(target=self._run, name="http-server", daemon=True)

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._servers[0].effective_port)

    def start(self) -> None:
        """Start the worker threads and serve in a daemon thread."""
        self._dispatcher.set_thread_count(self.limits.threads)
        self._thread.start()

    def running(self) -> bool:
        """True while the event loop runs."""
        return self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop accepting, let requests in progress finish (up to `timeout`), close every
        connection; False when a request was cut off."""
        deadline = time.monotonic() + timeout
        if not self._thread.is_alive():
            self._close_all()
            return True
        self._draining = True
        self._wake()
        drained = self._drained.wait(max(0.0, deadline - time.monotonic()))
        if not drained:
            log.warning("HTTP requests still in progress after %.1fs: cut off", timeout)
        self._closing = True
        self._wake()
        self._thread.join(max(0.5, deadline - time.monotonic()))
        self._dispatcher.shutdown(
            cancel_pending=True, timeout=max(0.0, deadline - time.monotonic())
        )
        return drained

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # already closed
            self._servers[0].pull_trigger()

    def _run(self) -> None:
        try:
            while not self._closing:
                if self._draining:
                    self._drain_step()
                poll2(_DRAIN_TICK_SECONDS if self._draining else _TICK_SECONDS, self._map)
        except Exception:
            log.exception("HTTP server event loop failed")
        finally:
            self._close_all()

    def _drain_step(self) -> None:
        """In the loop thread: close listeners, then every connection with nothing to do."""
        for server in self._servers:
            if server.accepting:
                server.accepting = False
                wasyncore_dispatcher.close(server)  # the listening socket only, not the trigger
        channels = [c for c in self._map.values() if isinstance(c, _Channel)]
        now = time.monotonic()
        for channel in channels:
            if channel.linger_until:
                if channel.linger_until < now:  # the listener's maintenance no longer runs
                    channel.stop_lingering()
            elif not (channel.requests or channel.total_outbufs_len):
                channel.will_close = True  # nothing in progress: closed on the next loop turn
        if not channels:
            self._drained.set()

    def _close_all(self) -> None:
        for obj in list(self._map.values()):
            with contextlib.suppress(OSError):
                obj.close()
        self._map.clear()


def call_within(timeout: float, fn: Callable[[], object], what: str) -> bool:
    """Run `fn` in a daemon thread and wait at most `timeout`; False (logged) if it is still
    running then, so a stop step that blocks cannot overrun the process's stop budget."""
    thread = threading.Thread(target=fn, name=what, daemon=True)
    thread.start()
    thread.join(max(0.0, timeout))
    if thread.is_alive():
        log.error("%s did not finish within %.1fs; going on without it", what, timeout)
        return False
    return True


def serve_until_signal(server: BackgroundServer) -> bool:
    """Serve until SIGTERM or SIGINT (True), or until the server's loop dies (False, logged)."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    while not stop.wait(0.5):
        if not server.running():
            log.error("the HTTP server stopped unexpectedly")
            return False
    return True


@contextlib.contextmanager
def exit_on_start_failure(service: str) -> Iterator[None]:
    """Any error while a service starts is one log line and exit code 1, not a traceback."""
    try:
        yield
    except Exception as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        log.error("%s cannot start: %s", service, reason)
        raise SystemExit(1) from None
