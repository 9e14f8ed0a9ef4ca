"""Push receiver service settings."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from eventaudit.contract import is_pubsub_id
from eventaudit.http import echo
from eventaudit.push.envelope import MAX_ENVELOPE_BYTES
from eventaudit.settings import CommonSettings, ListenAddress, split_list


class PushSettings(CommonSettings):
    """Settings of one push receiver process (`python -m eventaudit.push --help`)."""

    prog = "python -m eventaudit.push"

    subscriptions: str = Field(
        ..., description="comma-separated push subscription ids answered at POST /push"
    )
    listen_address: ListenAddress = Field(
        "127.0.0.1:9710", description="HOST:PORT for POST /push, /metrics and /healthz"
    )
    threads: int = Field(
        16, ge=2, le=256, description="HTTP worker threads: pushes handled at once"
    )
    receipt_timeout_seconds: float = Field(
        30.0,
        gt=0,
        le=600,
        description="longest a push waits for its receipt to be stored before answering 503 "
        "(keep it below the subscription's ack deadline)",
    )
    batch_size: int = Field(500, ge=1, le=10_000, description="receipts per store write")
    max_body_bytes: int = Field(
        MAX_ENVELOPE_BYTES,
        ge=1024,
        le=MAX_ENVELOPE_BYTES,
        description="largest push body (a 10 MB message is about 13.4 MB of envelope)",
    )
    oidc_audience: str | None = Field(
        None,
        min_length=1,
        description="require Pub/Sub's OIDC token with this audience (the push "
        "subscription's --push-auth-token-audience; {subscription} in it stands for the "
        "subscription's id, required when serving several); with --oidc-service-account",
    )
    oidc_service_account: str | None = Field(
        None,
        min_length=1,
        description="the push subscription's service account e-mail the token must name",
    )
    oidc_certs_url: str = Field(
        "https://www.googleapis.com/oauth2/v1/certs",
        description="where Google's token signing keys are fetched from",
    )
    lose_fraction: float = Field(
        0.0, ge=0, le=1, description="FAULT KNOB for demos: ack this fraction of events unrecorded"
    )

    @field_validator("subscriptions")
    @classmethod
    def _subscriptions(cls, value: str) -> str:
        for item in split_list(value):
            if not is_pubsub_id(item):
                raise ValueError(f"not a Pub/Sub id: {echo(item)}")
        return value

    @model_validator(mode="after")
    def _oidc_both(self) -> PushSettings:
        if (self.oidc_audience is None) != (self.oidc_service_account is None):
            raise ValueError("--oidc-audience and --oidc-service-account go together")
        several = len(self.subscription_list) > 1
        if several and self.oidc_audience and "{subscription}" not in self.oidc_audience:
            raise ValueError(
                "serving several subscriptions, --oidc-audience must hold {subscription}: one "
                "audience for all would let a token of one push deliveries of another"
            )
        if self.receipt_timeout_seconds <= self.store_timeout_seconds:
            raise ValueError(
                "receipt-timeout-seconds must exceed store-timeout-seconds (a push waits out "
                "one store write)"
            )
        return self

    @property
    def subscription_list(self) -> list[str]:
        return split_list(self.subscriptions)
