"""Publisher API settings."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field, field_validator

from eventaudit.contract import is_pubsub_id
from eventaudit.http import echo
from eventaudit.settings import CommonSettings, ListenAddress, split_list


def _topic_id(value: str) -> str:
    if not is_pubsub_id(value):
        raise ValueError(f"not a Pub/Sub topic id: {echo(value)}")
    return value


TopicId = Annotated[str, AfterValidator(_topic_id)]


class PublisherSettings(CommonSettings):
    """Settings of the publisher API (`python -m eventaudit.publisher --help`)."""

    prog = "python -m eventaudit.publisher"

    listen_address: ListenAddress = Field(
        "127.0.0.1:3000", description="HOST:PORT the API listens on"
    )
    users_topic: TopicId = Field("create-user", description="topic of POST /api/v1/users")
    topics: str = Field(
        "",
        description="if set, the only topics POST /api/v1/topics/<topic>/events publishes to "
        "(comma-separated); others answer 404. These and the users topic are published even "
        "when their existence cannot be checked (no pubsub.topics.get permission); any other "
        "topic then answers 503",
    )
    threads: int = Field(
        16,
        ge=2,
        le=256,
        description="HTTP worker threads; at most threads - 2 (at least 1) publishes are in "
        "progress at once (the publish slots), so that while Pub/Sub hangs /healthz and /metrics "
        "still find a thread",
    )
    publish_slot_wait_seconds: float = Field(
        0.5,
        ge=0,
        le=10,
        description="how long a publish finding every publish slot taken waits for one (a "
        "burst of more clients than slots); then it answers 503, and so does every such "
        "publish at once until a slot is given back (Pub/Sub hanging). 0: never wait",
    )
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

    @field_validator("topics")
    @classmethod
    def _topics(cls, value: str) -> str:
        for topic in split_list(value):
            _topic_id(topic)
        return value

    @property
    def publish_slots(self) -> int:
        """Publishes in progress at once: every thread but two (at least one is left free);
        publishes waiting for a slot use the others for at most publish_slot_wait_seconds."""
        return max(1, self.threads - 2)

    @property
    def topic_allow_list(self) -> frozenset[str]:
        """Topics the generic route may publish to; empty means any existing topic."""
        return frozenset(split_list(self.topics))
