"""HTTP pieces every service shares: JSON errors and /metrics exposition (serving: serving.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from werkzeug.exceptions import HTTPException

from eventaudit.serving import BackgroundServer, parse_listen_address

__all__ = [
    "BackgroundServer",
    "echo",
    "json_error",
    "metrics_view",
    "parse_listen_address",
    "register_json_errors",
]

log = logging.getLogger(__name__)


ECHO_LIMIT = 64


def echo(value: str, limit: int = ECHO_LIMIT) -> str:
    """`value` quoted for an error message: repr-escaped (a newline, an ANSI escape or a lone
    surrogate shows as its escape, never acts) and cut to `limit` characters, so an answer or
    a log line never carries the input whole (a 1 MiB key, a JSON value nested 980 deep)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


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
