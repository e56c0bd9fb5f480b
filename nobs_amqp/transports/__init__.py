"""The seam between nobs_amqp and a broker.

`base` says what a transport is (the `Transport` protocol and the deadlines of a publish);
`memory` is the in-process broker (memory://), `amqp/` is RabbitMQ. Nothing outside this
package names either: `connect` picks one for a project's URLs, loading only that one.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..urls import in_process
from .base import DEFAULT_HEARTBEAT, Transport

__all__ = ["DEFAULT_HEARTBEAT", "Transport", "connect"]


def connect(
    urls: Sequence[str],
    *,
    name: str,
    pool_size: int,
    publish_timeout: float,
    consumer_timeout: float,
    replicas: int = 3,
    heartbeat: int = DEFAULT_HEARTBEAT,
    max_message_size: int | None = None,
) -> Transport:
    """The transport for `urls` (not opened yet): the in-process broker, or RabbitMQ."""
    if in_process(urls[0]):
        from .memory import MemoryTransport  # only the transport the URLs ask for is loaded

        return MemoryTransport(urls[0], max_message_size=max_message_size)
    from .amqp.transport import AmqpTransport

    return AmqpTransport(
        urls,
        name=name,
        pool_size=pool_size,
        publish_timeout=publish_timeout,
        consumer_timeout=consumer_timeout,
        replicas=replicas,
        heartbeat=heartbeat,
        max_message_size=max_message_size,
    )
