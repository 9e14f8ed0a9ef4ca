"""Serve a Flask app with gunicorn from inside a service's `__main__`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from eventaudit.http import parse_listen_address


class _GunicornApp(BaseApplication):
    def __init__(self, factory: Callable[[], Flask], options: dict[str, Any]) -> None:
        self._factory = factory
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        return self._factory()


def serve_with_gunicorn(
    factory: Callable[[], Flask],
    listen_address: str,
    threads: int,
    on_worker_exit: Callable[[], None] | None = None,
) -> None:
    """Run one gthread worker: the app owns background threads (record buffer, evaluator)
    that must live in the worker, so `factory` is called after the fork, not before.
    """
    parse_listen_address(listen_address)
    options: dict[str, Any] = {
        "bind": listen_address,
        "workers": 1,
        "worker_class": "gthread",
        "threads": threads,
        "graceful_timeout": 15,
        "timeout": 60,
        "accesslog": None,
        "loglevel": "warning",
    }
    if on_worker_exit is not None:
        options["worker_exit"] = lambda _server, _worker: on_worker_exit()
    _GunicornApp(factory, options).run()
