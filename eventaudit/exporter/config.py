"""Exporter settings."""

from __future__ import annotations

import os
import re
import secrets
import socket
from datetime import timedelta

from pydantic import Field, field_validator, model_validator

from eventaudit.contract import is_pubsub_id
from eventaudit.exporter.buckets import Window, parse_duration
from eventaudit.http import echo
from eventaudit.settings import CommonSettings, ListenAddress, split_list


def _pubsub_id(text: str) -> str:
    if not is_pubsub_id(text):
        raise ValueError(f"{echo(text)} is not a Pub/Sub id")
    return text


def _pair(text: str) -> tuple[str, str]:
    topic, sep, sub = text.partition(":")
    if not sep or not topic or not sub:
        raise ValueError(f"expected TOPIC:SUBSCRIPTION, got {echo(text)}")
    return _pubsub_id(topic), _pubsub_id(sub)


class ExporterSettings(CommonSettings):
    """Exporter settings (`python -m eventaudit.exporter --help`). Lists are comma-separated."""

    prog = "python -m eventaudit.exporter"

    listen_address: ListenAddress = Field(
        "127.0.0.1:9800", description="HOST:PORT for /metrics and the API"
    )
    bucket: str = Field("10s", description="bucket length (publishTime granularity of evaluation)")
    settle_delay: str = Field("30s", description="how long after a bucket ends it is evaluated")
    windows: str = Field(
        "1m,5m,1h", description="trailing windows reported, each a whole number of buckets"
    )
    topics: str = Field("create-user", description="topics always reported, even with no traffic")
    expected_subscriptions: str = Field("", description="TOPIC:SUBSCRIPTION pairs always expected")
    excluded_subscriptions: str = Field("", description="TOPIC:SUBSCRIPTION pairs never reported")
    list_subscriptions: bool = Field(
        True, description="also expect what Pub/Sub lists for each topic"
    )
    subscription_refresh_seconds: float = Field(
        60.0, gt=0, le=86400, allow_inf_nan=False, description="how often to re-list"
    )
    retention: str = Field(
        "7d",
        description="records, digests and results published longer ago than this are dropped "
        "hourly, by whole hours of publish time (a record is kept up to an hour longer); at "
        "least the longest window + settle delay + one bucket",
    )
    lease_seconds: float = Field(
        30.0,
        ge=1,
        le=600,
        allow_inf_nan=False,
        description="how long a replica's lease of a topic lasts unless renewed (each "
        "evaluation renews it); another replica takes the topic over within this plus one "
        "bucket of the holder's death. At least 3 buckets",
    )
    replica_id: str | None = Field(
        None,
        description="this exporter replica's name in topic leases (default: host name, "
        "process id and a random suffix)",
    )
    threads: int = Field(8, ge=1, le=64, description="HTTP worker threads")
    missed_concurrency: int = Field(
        2,
        ge=1,
        le=63,
        description="/api/v1/missed listings computed at once (more are answered 429); less "
        "than --threads, so health and metrics always have a thread",
    )

    @field_validator("bucket", "settle_delay", "retention")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value

    @field_validator("expected_subscriptions", "excluded_subscriptions")
    @classmethod
    def _pairs(cls, value: str) -> str:
        for item in split_list(value):
            _pair(item)
        return value

    @field_validator("replica_id")
    @classmethod
    def _replica(cls, value: str | None) -> str | None:
        # Given, it is used as given: an empty one is a mistake, not "pick one for me".
        if value is not None and not _REPLICA_ID.fullmatch(value):
            raise ValueError("not a replica id (1 to 128 of A-Z a-z 0-9 . _ : -)")
        return value

    @field_validator("topics")
    @classmethod
    def _topics(cls, value: str) -> str:
        for item in split_list(value):
            _pubsub_id(item)
        return value

    @field_validator("windows")
    @classmethod
    def _window_items(cls, value: str) -> str:
        split_list(value)  # each item is parsed once the bucket is known
        return value

    @model_validator(mode="after")
    def _windows_fit(self) -> ExporterSettings:
        windows = self.window_list
        if not windows:
            raise ValueError("windows: at least one window is required")
        if len({w.label for w in windows}) != len(windows):
            raise ValueError("windows: duplicate window")
        # The oldest bucket a window sums starts up to one bucket before now - settle - window.
        needed = max(w.length for w in windows) + self.settle_delta + self.bucket_delta
        if self.retention_delta < needed:
            raise ValueError(
                "retention must cover the longest window plus the settle delay plus one bucket"
                f" ({needed.total_seconds():g}s)"
            )
        if self.lease_seconds < 3 * self.bucket_delta.total_seconds():
            raise ValueError(
                "lease-seconds must be at least 3 buckets (each evaluation, once per bucket, "
                f"renews it): {3 * self.bucket_delta.total_seconds():g}"
            )
        if self.missed_concurrency >= self.threads:
            raise ValueError(
                f"--missed-concurrency must be less than --threads ({self.threads}), got "
                f"{self.missed_concurrency}"
            )
        return self

    @property
    def bucket_delta(self) -> timedelta:
        """Bucket length."""
        return parse_duration(self.bucket)

    @property
    def settle_delta(self) -> timedelta:
        """Settle delay."""
        return parse_duration(self.settle_delay)

    @property
    def retention_delta(self) -> timedelta:
        """Record retention."""
        return parse_duration(self.retention)

    @property
    def window_list(self) -> list[Window]:
        """Parsed windows."""
        return [Window.parse(w, self.bucket_delta) for w in split_list(self.windows)]

    @property
    def expected_map(self) -> dict[str, set[str]]:
        """Configured topics and their configured subscriptions."""
        out: dict[str, set[str]] = {t: set() for t in split_list(self.topics)}
        for topic, sub in map(_pair, split_list(self.expected_subscriptions)):
            out.setdefault(topic, set()).add(sub)
        return out

    @property
    def excluded_set(self) -> set[tuple[str, str]]:
        """Excluded (topic, subscription) pairs."""
        return set(map(_pair, split_list(self.excluded_subscriptions)))


_REPLICA_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def replica_name(configured: str | None) -> str:
    """This replica's id: the configured one, else host name, process id and a random
    suffix (a restarted process is a new replica: it claims its leases under new epochs)."""
    if configured:
        return configured
    host = re.sub(r"[^A-Za-z0-9._:-]", "-", socket.gethostname())[:80] or "exporter"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"
