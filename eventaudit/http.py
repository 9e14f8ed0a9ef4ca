"""HTTP pieces every service shares: JSON errors, /metrics exposition, and serving."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from werkzeug.exceptions import HTTPException
from werkzeug.serving import BaseWSGIServer, make_server

log = logging.getLogger(__name__)


def json_error(status: int, message: str, **extra: Any) -> tuple[Response, int]:
    """A 4xx/5xx answer with a JSON body: {"error": ..., "status": ...}."""
    body = {"error": message, "status": status, **extra}
    return jsonify(body), status


def register_json_errors(app: Flask) -> None:
    """Every HTTP error (404 route, 405 method, 413 body, ...) answers JSON, never HTML."""

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        if exc.code == 413:
            limit = app.config.get("MAX_CONTENT_LENGTH")
            return json_error(413, f"request body exceeds the limit of {limit} bytes")
        return json_error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Response, int]:
        log.error("unhandled error serving request", exc_info=exc)
        return json_error(500, "internal error")


def metrics_view(registry: CollectorRegistry) -> Callable[[], Response]:
    """A view function exposing `registry` in the Prometheus text format."""

    def metrics() -> Response:
        return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)

    return metrics


def parse_listen_address(address: str) -> tuple[str, int]:
    """Split `host:port`, raising ValueError with the reason."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"listen address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


class BackgroundServer:
    """A threaded werkzeug server for a process whose main job is not HTTP (the subscriber)."""

    def __init__(self, app: Flask, address: str) -> None:
        host, port = parse_listen_address(address)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log per scrape
        self._server: BaseWSGIServer = make_server(host, port, app, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return int(self._server.server_port)

    def start(self) -> None:
        """Serve in a daemon thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and wait for the thread."""
        self._server.shutdown()
        self._thread.join(timeout=5)
