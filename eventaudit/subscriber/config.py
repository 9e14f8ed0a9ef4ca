"""Subscriber service settings."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from eventaudit.contract import is_pubsub_id
from eventaudit.http import echo
from eventaudit.settings import CommonSettings, ListenAddress


class SubscriberSettings(CommonSettings):
    """Settings of one subscriber process (`python -m eventaudit.subscriber --help`)."""

    prog = "python -m eventaudit.subscriber"

    subscription: str = Field(..., description="subscription id to consume")
    topic: str | None = Field(
        None, description="topic id (default: looked up from the subscription)"
    )
    listen_address: ListenAddress = Field(
        "127.0.0.1:9701", description="HOST:PORT for /metrics and /healthz"
    )
    batch_size: int = Field(500, ge=1, le=10_000, description="receipts per store write")
    flush_interval_seconds: float = Field(
        0.05, gt=0, le=10, description="longest wait to fill a batch"
    )
    max_outstanding_messages: int = Field(1000, ge=1, description="streaming-pull flow control")
    lease_extension_seconds: int = Field(
        10,
        ge=10,
        le=600,
        description="ack deadline the streaming pull asks for, and extends by while a message "
        "is being handled: messages a crashed subscriber held come back after about this long "
        "(the client library's default is 60)",
    )
    dead_letters: bool = Field(
        False,
        description="the subscription is on a dead-letter topic: record each message Pub/Sub "
        "moved there as a dead letter of the subscription it came from (its "
        "CloudPubSubDeadLetterSourceSubscription attribute)",
    )
    receipts: bool = Field(
        False,
        description="the subscription is on an audit topic of receipt messages published by "
        "consumers in other languages (docs/receipts.md): record each as a receipt of the "
        "subscription it names, if that subscription is one of the topic it names",
    )
    lose_fraction: float = Field(
        0.0, ge=0, le=1, description="FAULT KNOB for demos: ack this fraction of events unrecorded"
    )

    @field_validator("subscription", "topic")
    @classmethod
    def _pubsub_id(cls, value: str | None) -> str | None:
        if value is not None and not is_pubsub_id(value):
            raise ValueError(f"not a Pub/Sub id: {echo(value)}")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> SubscriberSettings:
        if self.dead_letters and self.receipts:
            raise ValueError("a subscription is of dead letters or of receipt messages, not both")
        return self
