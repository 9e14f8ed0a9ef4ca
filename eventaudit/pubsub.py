"""Pub/Sub clients whose gRPC channels carry every message Pub/Sub allows, on the emulator too.

Pub/Sub accepts messages up to 10 MB. For real Pub/Sub the client library already lifts
gRPC's 4 MiB receive limit, but with PUBSUB_EMULATOR_HOST it opens a bare insecure channel
that keeps it: a subscriber then stalls on the first message over 4 MiB, reopening its stream
on that message forever. These builders open the emulator channel with the library's own
options, and can add interceptors (the subscriber counts how its streams end).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import grpc
from google.cloud import pubsub_v1
from google.pubsub_v1.services.publisher.transports.grpc import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports.grpc import SubscriberGrpcTransport

# What the library sets on its channels to real Pub/Sub (see its transports/grpc.py).
UNLIMITED = -1
_KEEPALIVE_MS = 30_000
_MAX_METADATA_BYTES = 4 * 1024 * 1024


def channel_options(
    max_message_bytes: int = UNLIMITED, keepalive: bool = False
) -> list[tuple[str, int]]:
    """gRPC channel options allowing messages of `max_message_bytes` (-1: no limit).

    `keepalive` pings every 30 s as the library does for real Pub/Sub; never on the emulator,
    whose gRPC server allows a ping every 5 minutes and answers more with GOAWAY
    "too_many_pings", breaking every stream of the connection.
    """
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_metadata_size", _MAX_METADATA_BYTES),
    ]
    if keepalive:
        options.append(("grpc.keepalive_time_ms", _KEEPALIVE_MS))
    return options


def _emulator_channel(
    host: str, interceptors: Sequence[Any], max_message_bytes: int
) -> grpc.Channel:
    channel = grpc.insecure_channel(host, options=channel_options(max_message_bytes))
    return grpc.intercept_channel(channel, *interceptors) if interceptors else channel


def subscriber_client(
    interceptors: Sequence[Any] = (), max_message_bytes: int = UNLIMITED
) -> pubsub_v1.SubscriberClient:
    """A SubscriberClient for PUBSUB_EMULATOR_HOST when set, else for real Pub/Sub.

    `interceptors` are gRPC client interceptors put on the channel; `max_message_bytes`
    exists for tests that need to reproduce the 4 MiB stall.
    """
    emulator = os.environ.get("PUBSUB_EMULATOR_HOST")
    if emulator:
        channel = _emulator_channel(emulator, interceptors, max_message_bytes)
        return pubsub_v1.SubscriberClient(
            transport=SubscriberGrpcTransport(host=emulator, channel=channel)
        )
    if not interceptors and max_message_bytes == UNLIMITED:
        return pubsub_v1.SubscriberClient()

    def channel_factory(*args: Any, **kwargs: Any) -> grpc.Channel:
        # The library's own channel (credentials, endpoint), with our options and interceptors.
        kwargs["options"] = channel_options(max_message_bytes, keepalive=True)
        channel = SubscriberGrpcTransport.create_channel(*args, **kwargs)
        return grpc.intercept_channel(channel, *interceptors) if interceptors else channel

    def transport(**kwargs: Any) -> SubscriberGrpcTransport:
        return SubscriberGrpcTransport(channel=channel_factory, **kwargs)

    return pubsub_v1.SubscriberClient(transport=transport)


def publisher_client(*args: Any, **kwargs: Any) -> pubsub_v1.PublisherClient:
    """A PublisherClient (same arguments) whose emulator channel allows Pub/Sub's 10 MB."""
    emulator = os.environ.get("PUBSUB_EMULATOR_HOST")
    if emulator and "transport" not in kwargs:
        channel = _emulator_channel(emulator, (), UNLIMITED)
        kwargs["transport"] = PublisherGrpcTransport(host=emulator, channel=channel)
    return pubsub_v1.PublisherClient(*args, **kwargs)
