"""The transport seam: the little a producer and a consumer need from a broker.

Two implementations: `amqp.AmqpTransport` (RabbitMQ) and the in-memory broker.
Everything above this seam (producing, consuming, retrying, dead-lettering) is
written once against it and never knows which broker it talks to.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from .message import Message
from .topology import ServerVersion, Topology


class Delivery(Protocol):
    """A message handed to a consumer, to be settled exactly once."""

    @property
    def message(self) -> Message: ...

    @property
    def queue(self) -> str: ...

    @property
    def redelivered(self) -> bool:
        """The broker handed this message out before (so its delivery count is the broker's)."""

    async def ack(self) -> None: ...

    async def nack(self, *, requeue: bool) -> None: ...


Handler = Callable[[Delivery], Coroutine[Any, Any, None]]


class Subscription(Protocol):
    async def cancel(self) -> None:
        """Stop deliveries; those already sent still reach the handler before this returns."""

    async def flush(self) -> None:
        """Send the acks that are waiting to be batched, now."""

    async def close(self) -> None:
        """Flush acks, then give every message still unsettled back to the queue."""


class Transport(Protocol):
    @property
    def server_version(self) -> ServerVersion: ...

    @property
    def vhost(self) -> str: ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def declare(self, topology: Topology) -> None:
        """Declare idempotently; raise TopologyMismatchError for an object with other arguments."""

    async def publish(self, exchange: str, routing_key: str, message: Message) -> None:
        """Publish persistent and mandatory; return once the broker confirmed it."""

    async def consume(self, queue: str, prefetch: int, handler: Handler) -> Subscription:
        """Deliver messages of `queue` to `handler`, at most `prefetch` unsettled at once."""

    async def message_count(self, queue: str) -> int:
        """Messages ready in `queue` (not counting those delivered and unsettled)."""

    async def purge(self, queue: str) -> int:
        """Delete the messages ready in `queue`; return how many."""
