"""The HTTP server module: listen addresses, connection limits, and the server's own behaviour
(graceful stop, request deadline, JSON errors, lingering close) on loopback sockets."""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import threading
from collections.abc import Iterator

import pytest
from flask import Flask, request

from eventaudit import serving
from eventaudit.http import register_json_errors
from eventaudit.serving import BackgroundServer, ServerLimits, parse_listen_address
from tools.stack import free_port


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:3000", ("127.0.0.1", 3000)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
        ("localhost:65535", ("localhost", 65535)),
        ("[::1]:80", ("::1", 80)),
        ("[::]:9800", ("::", 9800)),
        ("127.0.0.1:0080", ("127.0.0.1", 80)),
    ],
)
def test_listen_address_accepted(address: str, expected: tuple[str, int]) -> None:
    assert parse_listen_address(address) == expected


@pytest.mark.parametrize(
    "address",
    [
        "9800",
        ":9800",
        "127.0.0.1:",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:99999999999999999999",
        "127.0.0.1:-1",
        "127.0.0.1:+80",
        "127.0.0.1: 80",
        "127.0.0.1:80 ",
        ":80\n",
        "127.0.0.1:80\n",
        "127.0.0.1:８０",  # fullwidth digits  # noqa: RUF001
        "127.0.0.1:٨٠",  # Arabic-Indic digits
        "127.0.0.1:²",
        "127.0.0.1:0x50",
        "::1:80",  # IPv6 needs brackets
        "[::1:80",
        "::1]:80",
        "[]:80",
        "[127.0.0.1]:80",
        "local host:80",
        "host\n:80",
        "host\x00:80",
        "ho/st:80",
        "",
    ],
)
def test_listen_address_rejected(address: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen_address(address)


@pytest.mark.parametrize(
    ("soft", "hard", "raised_to", "limit"),
    [
        (100_000, 100_000, None, 1000),  # enough already
        (1024, 100_000, 2256, 1000),  # raised to what 1000 connections need
        (1024, 1024, 1024, 384),  # cannot raise: fewer connections, not accept() failing
        (1024, resource.RLIM_INFINITY, 2256, 1000),
    ],
)
def test_connection_limit_fits_the_open_file_limit(
    monkeypatch: pytest.MonkeyPatch, soft: int, hard: int, raised_to: int | None, limit: int
) -> None:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda _: (soft, hard))
    monkeypatch.setattr(resource, "setrlimit", lambda _, value: calls.append(value))
    assert serving._connection_limit(1000) == limit
    assert calls == ([] if raised_to is None else [(raised_to, hard)])


def _app() -> Flask:
    app = Flask("t")
    entered, release = threading.Event(), threading.Event()
    app.config.update(ENTERED=entered, RELEASE=release)

    @app.post("/echo")
    def echo() -> dict[str, int]:
        return {"bytes": len(request.get_data())}

    @app.get("/wait")
    def wait() -> dict[str, bool]:
        entered.set()
        return {"released": release.wait(10)}

    register_json_errors(app)
    return app


@pytest.fixture
def server() -> Iterator[tuple[BackgroundServer, Flask]]:
    app = _app()
    srv = BackgroundServer(
        app,
        f"127.0.0.1:{free_port()}",
        ServerLimits(threads=2, max_body_bytes=100, request_timeout_seconds=1),
    )
    srv.start()
    yield srv, app
    app.config["RELEASE"].set()
    srv.stop(timeout=2)


def _exchange(port: int, data: bytes, *, close_write: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        with contextlib.suppress(OSError):
            s.sendall(data)
            if close_write:
                s.shutdown(socket.SHUT_WR)
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := s.recv(65_536):
                answer += chunk
    return answer


def _status_and_json(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Content-Type: application/json" in head, answer[:300]
    return int(head.split()[1]), json.loads(body)


def test_body_within_the_limit_reaches_the_app(server) -> None:
    srv, _ = server
    body = b"x" * 100  # exactly the limit
    answer = _exchange(srv.port, b"POST /echo HTTP/1.1\r\nContent-Length: 100\r\n\r\n" + body)
    assert _status_and_json(answer) == (200, {"bytes": 100})


def test_over_the_limit_answer_reaches_a_client_still_sending(server) -> None:
    # The client sends 4 MB while the server answers 413 after 100 bytes: the server reads
    # and discards the rest before closing, so the answer is not destroyed by a reset.
    srv, _ = server
    head = b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunks = b"".join(b"%x\r\n%s\r\n" % (65_536, b"y" * 65_536) for _ in range(64))
    answer = _exchange(srv.port, head + chunks + b"0\r\n\r\n")
    assert _status_and_json(answer) == (
        413,
        {"error": "request body exceeds the limit of 100 bytes", "status": 413},
    )


def test_a_request_not_received_in_time_is_408(server) -> None:
    srv, _ = server
    answer = _exchange(
        srv.port, b"POST /echo HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc", close_write=False
    )
    assert _status_and_json(answer) == (
        408,
        {"error": "request not received within 1s", "status": 408},
    )


def test_an_exception_in_the_parser_is_a_400_not_a_dropped_connection(server) -> None:
    srv, _ = server
    answer = _exchange(srv.port, b"GET http://[bad/ HTTP/1.1\r\n\r\n")
    assert _status_and_json(answer) == (
        400,
        {"error": "Bad URI: Invalid IPv6 URL", "status": 400},
    )


def _wait_in_background(srv: BackgroundServer, app: Flask) -> tuple[threading.Thread, list]:
    """A client whose GET /wait is being served (blocked in the app) when this returns."""
    answers: list[bytes] = []
    client = threading.Thread(
        target=lambda: answers.append(_exchange(srv.port, b"GET /wait HTTP/1.1\r\n\r\n"))
    )
    client.start()
    assert app.config["ENTERED"].wait(10)
    return client, answers


def test_stop_finishes_the_request_in_progress_and_refuses_new_connections(server) -> None:
    srv, app = server
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as idle:
        # A keep-alive connection, idle after its answer.
        idle.sendall(b"POST /echo HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        answer = b""
        while not answer.endswith(b"}\n"):
            answer += idle.recv(65_536)
        assert answer.startswith(b"HTTP/1.1 200 OK")
        client, answers = _wait_in_background(srv, app)
        stopped: list[bool] = []
        stopper = threading.Thread(target=lambda: stopped.append(srv.stop(timeout=10)))
        stopper.start()
        assert idle.recv(1) == b""  # the idle connection is closed at once
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    assert stopper.is_alive()  # still waiting for /wait
    app.config["RELEASE"].set()
    stopper.join(15)
    client.join(15)
    assert stopped == [True]
    assert _status_and_json(answers[0]) == (200, {"released": True})
    assert not srv.running()


def test_stop_cuts_a_request_that_outlasts_the_timeout(server) -> None:
    srv, app = server
    client, answers = _wait_in_background(srv, app)
    assert srv.stop(timeout=0.5) is False
    client.join(15)
    assert answers == [b""]  # closed without an answer, and stop() said so


def test_stop_waits_out_a_connection_lingering_after_an_error_answer(server) -> None:
    srv, _ = server
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        # Over the limit: answered 413, then the server lingers while this client stays open.
        s.sendall(b"POST /echo HTTP/1.1\r\nContent-Length: 1000\r\n\r\n")
        answer = b""
        while b"}" not in answer:
            answer += s.recv(65_536)
        assert _status_and_json(answer)[0] == 413
        assert srv.stop(timeout=8) is True  # the linger ends; nothing was cut off
        assert s.recv(1) == b""
