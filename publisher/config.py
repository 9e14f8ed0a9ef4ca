"""Publisher API settings."""

from __future__ import annotations

from pydantic import Field

from eventaudit.settings import CommonSettings, ListenAddress


class PublisherSettings(CommonSettings):
    """Settings of the publisher API (`python -m eventaudit.publisher --help`)."""

    prog = "python -m eventaudit.publisher"

    listen_address: ListenAddress = Field(
        "127.0.0.1:3000", description="HOST:PORT the API listens on"
    )
    users_topic: str = Field("create-user", min_length=3, description="topic of POST /api/v1/users")
    threads: int = Field(16, ge=1, le=256, description="gunicorn worker threads")
    max_body_bytes: int = Field(
        1_048_576, ge=1024, le=10_000_000, description="largest request body"
    )
    payload_cap_bytes: int = Field(
        16_384, ge=256, description="payload bytes kept in PublishRecord"
    )
    record_buffer_capacity: int = Field(
        100_000, ge=1, description="publish records held while the store is down"
    )
    record_batch_size: int = Field(
        500, ge=1, le=10_000, description="publish records per store write"
    )
    publish_timeout_seconds: float = Field(
        10.0, gt=0, le=600, description="wait for Pub/Sub per request"
    )
