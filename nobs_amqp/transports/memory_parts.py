"""The in-memory broker's parts: its queues, exchanges, consumers and messages, and what it hands
out (deliveries, subscriptions, a stream's followers); topic matching."""

from __future__ import annotations

import asyncio
import heapq
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from ..message import Message
from ..topology import ExchangeSpec, QueueSpec
from .base import Handler

#: On a quorum queue (RabbitMQ 4) priorities up to this one are normal, those above it high.
QUORUM_NORMAL_PRIORITY = 4


@dataclass(slots=True)
class Entry:
    message: Message
    routing_key: str
    returned: int = 0  # how often it came back unsettled (quorum `x-delivery-count`)
    expires_at: float | None = None


@dataclass(slots=True)
class Exchange:
    spec: ExchangeSpec
    bindings: list[tuple[str, str, bool]] = field(default_factory=list)  # (key, destination, to_exchange)


class Consumer:
    def __init__(self, queue: Queue, prefetch: int, handler: Handler) -> None:
        self.queue = queue
        self.prefetch = prefetch
        self.handler = handler
        self.unacked: dict[int, Entry] = {}
        self.active = True
        self.handing: set[asyncio.Task[None]] = set()  # handler calls not finished yet
        self.loop = asyncio.get_running_loop()  # where its handlers run


class Queue:
    def __init__(self, spec: QueueSpec) -> None:
        self.spec = spec
        args = spec.arguments
        ttl = args.get("x-message-ttl")
        self.ttl = int(ttl) / 1000 if isinstance(ttl, int) else None
        limit = args.get("x-delivery-limit")
        self.delivery_limit = limit if isinstance(limit, int) and limit >= 0 else None
        # A classic queue has `x-max-priority` levels; a quorum one (RabbitMQ 4) two: 0-4 and 5 up.
        self.prioritised = isinstance(args.get("x-max-priority"), int)
        self.two_levels = args.get("x-queue-type") == "quorum"
        length = args.get("x-max-length")
        self.max_length = length if isinstance(length, int) and length >= 0 else None
        self.rejects = args.get("x-overflow") == "reject-publish"  # refuse when full, not drop the head
        self.ready: list[tuple[int, int, Entry]] = []  # heap of (-priority, sequence, entry)
        self.consumers: list[Consumer] = []
        #: A stream keeps every message (`log`) and hands each to every follower.
        self.stream = args.get("x-queue-type") == "stream"
        self.log: list[Message] = []
        self.followers: list[Callable[[Message], None]] = []

    def push(self, entry: Entry, sequence: int) -> None:
        priority = entry.message.priority or 0
        if self.two_levels:
            priority = 1 if priority > QUORUM_NORMAL_PRIORITY else 0
        elif not self.prioritised:
            priority = 0
        heapq.heappush(self.ready, (-priority, sequence, entry))


class Broker(Protocol):
    """What a delivery and a subscription need of their Broker."""

    def settle(self, consumer: Consumer, tag: int, *, requeue: bool | None) -> None: ...

    def close_consumer(self, consumer: Consumer) -> None: ...


class MemoryDelivery:
    __slots__ = ("_broker", "_consumer", "_tag", "message", "queue", "redelivered")

    def __init__(self, broker: Broker, consumer: Consumer, tag: int, entry: Entry) -> None:
        self._broker = broker
        self._consumer = consumer
        self._tag = tag
        self.queue = consumer.queue.spec.name
        self.redelivered = entry.returned > 0
        message = entry.message
        if entry.returned and consumer.queue.spec.arguments.get("x-queue-type") == "quorum":
            message = replace(message, headers={**message.headers, "x-delivery-count": entry.returned})
        self.message = message

    async def ack(self) -> None:
        self._broker.settle(self._consumer, self._tag, requeue=None)

    async def nack(self, *, requeue: bool) -> None:
        self._broker.settle(self._consumer, self._tag, requeue=requeue)


class MemorySubscription:
    def __init__(self, broker: Broker, consumer: Consumer) -> None:
        self._broker = broker
        self._consumer = consumer

    async def cancel(self) -> None:
        consumer = self._consumer
        consumer.active = False
        if consumer in consumer.queue.consumers:
            consumer.queue.consumers.remove(consumer)
        # As with basic.cancel-ok: deliveries already sent reach the handler first.
        await asyncio.gather(*consumer.handing)

    async def flush(self) -> None:
        pass  # acks take effect at once

    async def close(self) -> None:
        self._broker.close_consumer(self._consumer)


class MemoryFollower:
    def __init__(self, stream: Queue, handler: Callable[[Message], None]) -> None:
        self._stream = stream
        self._handler = handler

    async def cancel(self) -> None:
        if self._handler in self._stream.followers:
            self._stream.followers.remove(self._handler)

    async def flush(self) -> None:
        pass

    async def close(self) -> None:
        await self.cancel()


def matches(kind: str, pattern: str, key: str) -> bool:
    if kind == "fanout":
        return True
    if kind == "direct":
        return pattern == key
    return _topic(pattern).fullmatch(key) is not None


_TOPIC_CACHE: dict[str, re.Pattern[str]] = {}


def _topic(pattern: str) -> re.Pattern[str]:
    """AMQP topic pattern as a regex: `*` is one word, `#` zero or more."""
    compiled = _TOPIC_CACHE.get(pattern)
    if compiled is None:
        parts = []
        for word in pattern.split("."):
            parts.append(r"(?:[^.]*)" if word == "*" else r"(?:.*)" if word == "#" else re.escape(word))
        regex = r"\.".join(parts)
        # `#` may match zero words: let "a.#" match "a" and "#.b" match "b".
        regex = regex.replace(r"\.(?:.*)", r"(?:\..*)?").replace(r"(?:.*)\.", r"(?:.*\.)?")
        compiled = _TOPIC_CACHE[pattern] = re.compile(regex)
    return compiled
