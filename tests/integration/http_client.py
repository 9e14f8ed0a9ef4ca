"""Plain HTTP calls the integration tests make to the services they start."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """Status and body; an HTTP error status is an answer, not an exception."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def timed_get(url: str, timeout: float = 5.0) -> tuple[int, bytes, float]:
    """Status, body and seconds taken; status 0 when it timed out or was refused."""
    started = time.monotonic()
    try:
        status, body = get(url, timeout)
    except OSError as exc:
        return 0, repr(exc).encode(), time.monotonic() - started
    return status, body, time.monotonic() - started


def post(url: str, body: bytes = b"") -> tuple[int, dict[str, Any]]:
    """Status and JSON answer of a POST."""
    req = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def metric(url: str, name: str, labels: dict[str, str]) -> float | None:
    """The first sample of `name` on a /metrics page whose labels include `labels`."""
    status, body = get(url)
    assert status == 200, body
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None
