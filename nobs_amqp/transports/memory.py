"""The in-memory broker behind `memory://`: RabbitMQ's semantics, without RabbitMQ.

It implements the transport seam with the parts of AMQP nobs_amqp relies on, so
producer, consumer, retry and dead-letter code run unchanged on it: confirmed and
mandatory publishing, default/direct/fanout/topic exchanges with exchange-to-exchange
bindings and alternate exchanges, queues with message TTL, dead-lettering (with
`x-death`), quorum delivery limits (with `x-delivery-count`), priorities, `x-max-length`
(dropping the head), consumers with prefetch, ack and nack, and leases (what an exclusive
queue is to RabbitMQ: one transport holds one at a time, until it closes).

Time is virtual: it runs with the event loop's clock, and `await broker.advance(s)`
jumps ahead, expiring messages in order, so a test sees a five-minute delay in no
time. Brokers are per URL (`memory://`, `memory://other`) and live in this process.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import ClassVar

from ..errors import MemoryBrokerLoopError, NotFoundError, TopologyMismatchError, UnroutableError
from ..message import DIRECT_REPLY_TO, Message, is_reply_address, wall_clock
from ..topology import ServerVersion, Topology, difference
from ..urls import memory_name
from .base import Handler, Inbox, LeaseState, check_size
from .memory_parts import Consumer as _Consumer
from .memory_parts import Entry as _Entry
from .memory_parts import Exchange as _Exchange
from .memory_parts import MemoryDelivery, MemoryFollower, MemorySubscription, matches
from .memory_parts import Queue as _Queue

log = logging.getLogger("nobs_amqp")


class MemoryBroker:
    """One in-memory broker. Get the one a URL names with `MemoryBroker.named(url)`."""

    _brokers: ClassVar[dict[str, MemoryBroker]] = {}

    def __init__(self) -> None:
        self.exchanges: dict[str, _Exchange] = {}
        self.queues: dict[str, _Queue] = {}
        self._offset = 0.0
        self._pinned: float | None = None  # the clock stands still while advance() works
        self._sequence = itertools.count()
        self._tags = itertools.count(1)
        self._timer: asyncio.TimerHandle | None = None
        self.leases: dict[str, object] = {}  # lease -> the transport that holds it
        self.claims: dict[str, float] = {}  # claim -> when it lapses (the virtual clock)
        self.inboxes: dict[str, Inbox] = {}  # direct reply-to address -> who gets its replies

    @classmethod
    def named(cls, url: str) -> MemoryBroker:
        """The broker of `url` (`memory://` or `memory://NAME`), made on first use."""
        return cls._brokers.setdefault(memory_name(url), cls())

    @classmethod
    def forget(cls, url: str) -> None:
        """Drop the broker of `url` and everything in it."""
        broker = cls._brokers.pop(memory_name(url), None)
        if broker is not None and broker._timer is not None:
            broker._timer.cancel()

    # -- clock ---------------------------------------------------------------------------

    def now(self) -> float:
        if self._pinned is not None:
            return self._pinned
        return asyncio.get_running_loop().time() + self._offset

    def skew(self) -> float:
        """How far the virtual clock is ahead of the real one, in seconds."""
        return self.now() - asyncio.get_running_loop().time()

    async def advance(self, seconds: float) -> None:
        """Move the clock `seconds` ahead, expiring every message that falls due on the way,
        each at its own instant (a message moving on starts its next wait exactly then)."""
        target = self.now() + seconds
        try:
            while (due := self._next_expiry()) is not None and due <= target:
                self._pinned = max(due, self.now())
                self._expire_due()
            self._pinned = target
            self._expire_due()
        finally:
            self._pinned = None
            self._offset = target - asyncio.get_running_loop().time()
            self._schedule()
        await asyncio.sleep(0)  # let handlers of what became ready start

    def seconds_to_next_expiry(self) -> float | None:
        """How far the clock is from the next message expiry (None: nothing waits)."""
        due = self._next_expiry()
        return None if due is None else max(0.0, due - self.now())

    def waiting(self, queues: Iterable[str]) -> int:
        """Messages ready in the named queues (those that exist)."""
        return sum(len(self.queues[name].ready) for name in queues if name in self.queues)

    def messages(self, queue: str) -> list[Message]:
        """The messages ready in `queue`, in delivery order, left where they are (a peek)."""
        found = self.queues.get(queue)
        return [entry.message for _, _, entry in sorted(found.ready, key=lambda item: item[:2])] if found else []

    def _next_expiry(self) -> float | None:
        heads = [q.ready[0][2].expires_at for q in self.queues.values() if q.ttl is not None and q.ready]
        return min((h for h in heads if h is not None), default=None)

    def _expire_due(self) -> None:
        now = self.now()
        for queue in list(self.queues.values()):
            while queue.ttl is not None and queue.ready:
                entry = queue.ready[0][2]
                if entry.expires_at is None or entry.expires_at > now:
                    break
                heapq.heappop(queue.ready)
                self._dead_letter(queue, entry, "expired")
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        due = self._next_expiry()
        if due is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(due - self._offset, self._expire_due)

    # -- topology ------------------------------------------------------------------------

    def declare(self, topology: Topology) -> None:
        for exchange in topology.exchanges:
            self._check("exchange", exchange.name, exchange.arguments, self.exchanges.get(exchange.name))
            existing = self.exchanges.get(exchange.name)
            if existing is not None and existing.spec.type != exchange.type:
                raise TopologyMismatchError(
                    "exchange", exchange.name, "/", f"type: declared {exchange.type!r}, existing {existing.spec.type!r}"
                )
            self.exchanges.setdefault(exchange.name, _Exchange(exchange))
        for queue in topology.queues:
            self._check("queue", queue.name, queue.arguments, self.queues.get(queue.name))
            self.queues.setdefault(queue.name, _Queue(queue))
        for binding in topology.bindings:
            source = self.exchanges[binding.source]
            target = (binding.routing_key, binding.destination, binding.to_exchange)
            if target not in source.bindings:
                source.bindings.append(target)

    @staticmethod
    def _check(kind: str, name: str, arguments: Mapping[str, object], existing: _Exchange | _Queue | None) -> None:
        if existing is not None and (diff := difference(arguments, existing.spec.arguments)):
            raise TopologyMismatchError(kind, name, "/", diff)

    # -- routing -------------------------------------------------------------------------

    def publish(self, exchange: str, routing_key: str, message: Message) -> bool:
        """Route `message`; False if no queue took it."""
        queues = self._route(exchange, routing_key, set())
        for name in queues:
            self._enqueue(self.queues[name], _Entry(message, routing_key))
        return bool(queues)

    def offer(self, queue: str, message: Message) -> bool:
        """Put `message` into `queue` unless it refuses it (full, with reject-publish): a rate
        limiter's permit. UnroutableError when there is no such queue."""
        found = self.queues.get(queue)
        if found is None:
            raise UnroutableError(queue)
        self._expire_due()  # what fell due just now, before its timer ran
        if found.rejects and found.max_length is not None and len(found.ready) >= found.max_length:
            return False
        self._enqueue(found, _Entry(message, queue))
        return True

    def _route(self, exchange: str, key: str, seen: set[str]) -> set[str]:
        if exchange == "":
            return {key} if key in self.queues else set()
        found = self.exchanges.get(exchange)
        if found is None or exchange in seen:
            return set()
        seen.add(exchange)
        queues: set[str] = set()
        for pattern, destination, to_exchange in found.bindings:
            if matches(found.spec.type, pattern, key):
                if to_exchange:
                    queues |= self._route(destination, key, seen)
                elif destination in self.queues:
                    queues.add(destination)
        alternate = found.spec.arguments.get("alternate-exchange")
        if not queues and isinstance(alternate, str):
            queues = self._route(alternate, key, seen)
        return queues

    def _enqueue(self, queue: _Queue, entry: _Entry) -> None:
        if queue.stream:
            queue.log.append(entry.message)
            for follower in list(queue.followers):
                follower(entry.message)
            return
        if queue.ttl is not None:
            entry.expires_at = self.now() + queue.ttl
        queue.push(entry, next(self._sequence))
        while queue.max_length is not None and len(queue.ready) > queue.max_length:
            self._dead_letter(queue, heapq.heappop(queue.ready)[2], "maxlen")  # RabbitMQ's drop-head
        if queue.ttl is not None:
            self._schedule()
        self._dispatch(queue)

    def _dead_letter(self, queue: _Queue, entry: _Entry, reason: str) -> None:
        exchange = queue.spec.arguments.get("x-dead-letter-exchange")
        if not isinstance(exchange, str):
            log.debug("memory broker: %s dropped a message (%s, no dead-letter exchange)", queue.spec.name, reason)
            return
        key = queue.spec.arguments.get("x-dead-letter-routing-key")
        key = key if isinstance(key, str) else entry.routing_key
        deaths = entry.message.headers.get("x-death")
        death = {"queue": queue.spec.name, "reason": reason, "count": 1, "routing-keys": [entry.routing_key]}
        headers = {k: v for k, v in entry.message.headers.items() if k != "x-delivery-count"}
        headers["x-death"] = [death, *(deaths if isinstance(deaths, list) else [])]
        if not self.publish(exchange, key, replace(entry.message, headers=headers)):
            log.warning("memory broker: dead letter from %s to %s was unroutable", queue.spec.name, exchange)

    # -- consuming -----------------------------------------------------------------------

    def _dispatch(self, queue: _Queue) -> None:
        while queue.ready:
            consumer = next((c for c in queue.consumers if c.active and len(c.unacked) < c.prefetch), None)
            if consumer is None:
                return
            _, _, entry = heapq.heappop(queue.ready)
            # Round-robin: the consumer that just got a message goes to the back.
            queue.consumers.remove(consumer)
            queue.consumers.append(consumer)
            tag = next(self._tags)
            consumer.unacked[tag] = entry
            delivery = MemoryDelivery(self, consumer, tag, entry)
            task = asyncio.get_running_loop().create_task(consumer.handler(delivery))
            consumer.handing.add(task)
            task.add_done_callback(consumer.handing.discard)

    def settle(self, consumer: _Consumer, tag: int, *, requeue: bool | None) -> None:
        """Ack (`requeue` None), or nack with or without requeue."""
        entry = consumer.unacked.pop(tag, None)
        if entry is None:
            raise RuntimeError(f"delivery tag {tag} is not unacked (settled twice?)")
        queue = consumer.queue
        if requeue is True:
            self._return(queue, entry)
        elif requeue is False:
            self._dead_letter(queue, entry, "rejected")
        self._dispatch(queue)

    def _return(self, queue: _Queue, entry: _Entry) -> None:
        entry.returned += 1
        if queue.delivery_limit is not None and entry.returned > queue.delivery_limit:
            self._dead_letter(queue, entry, "delivery_limit")
            return
        queue.push(entry, -next(self._sequence))  # back to the head, as RabbitMQ returns it

    def close_consumer(self, consumer: _Consumer) -> None:
        consumer.active = False
        queue = consumer.queue
        if consumer in queue.consumers:
            queue.consumers.remove(consumer)
        for tag in sorted(consumer.unacked, reverse=True):
            self._return(queue, consumer.unacked.pop(tag))
        self._dispatch(queue)


class MemoryTransport:
    """The transport seam over a MemoryBroker."""

    def __init__(self, url: str, *, max_message_size: int | None = None) -> None:
        self._url = url
        self._max_message_size = max_message_size
        self.broker = MemoryBroker.named(url)
        self._leases: set[str] = set()  # the leases this transport took (and holds, if the broker agrees)
        self._reply_to = f"{DIRECT_REPLY_TO}.memory-{next(_ADDRESSES)}"  # as RabbitMQ rewrites it

    @property
    def server_version(self) -> ServerVersion:
        return (4, 0, 0)

    @property
    def vhost(self) -> str:
        return "/"

    @property
    def url(self) -> str:
        return self._url

    def check_size(self, destination: str, message: Message) -> None:
        """As RabbitMQ 4.x (whose version this broker says it is) checks by default, or the project's limit."""
        check_size(destination, message, self._max_message_size, self.server_version)

    def now(self) -> datetime:
        """The virtual clock: this machine's time plus however far `advance()` moved it."""
        return wall_clock() + timedelta(seconds=self.broker.skew())

    async def advance(self, seconds: float) -> None:
        await self.broker.advance(seconds)

    def seconds_to_next_expiry(self) -> float | None:
        return self.broker.seconds_to_next_expiry()

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        for name in list(self._leases):
            await self.release(name)
        inbox = self.broker.inboxes.pop(self._reply_to, None)
        if inbox is not None:
            inbox.lost("the connection that would receive them closed")

    async def lease(self, name: str) -> LeaseState:
        holder = self.broker.leases.setdefault(name, self)
        if holder is not self:
            self._leases.discard(name)
            return "busy"
        if name in self._leases:
            return "held"
        self._leases.add(name)
        return "taken"

    async def release(self, name: str) -> None:
        self._leases.discard(name)
        if self.broker.leases.get(name) is self:
            del self.broker.leases[name]

    async def declare(self, topology: Topology) -> None:
        self._same_loop()
        self.broker.declare(topology)

    async def publish(self, exchange: str, routing_key: str, message: Message) -> None:
        self._same_loop()
        self.check_size(exchange or routing_key, message)
        if exchange and exchange not in self.broker.exchanges:
            raise NotFoundError(exchange, f"no exchange '{exchange}' in vhost '/'")
        if not self.broker.publish(exchange, routing_key, message):
            raise UnroutableError(exchange or routing_key)

    async def take_permit(self, queue: str) -> bool:
        return self.broker.offer(queue, Message(b"", "", "", "", self.now()))

    async def request(self, exchange: str, routing_key: str, message: Message, inbox: Inbox) -> None:
        self.broker.inboxes[self._reply_to] = inbox
        await self.publish(exchange, routing_key, replace(message, reply_to=self._reply_to))

    async def reply(self, address: str, reply: Message) -> None:
        if not is_reply_address(address):
            log.warning("refused to reply to %r: not a direct reply-to address", address)
            return
        inbox = self.broker.inboxes.get(address)
        if inbox is None:
            log.debug("a reply to %s was dropped: no one consumes it", address)
            return
        asyncio.get_running_loop().call_soon(inbox.replied, reply)

    def fixed_ack_timeout(self) -> float | None:
        return None  # no delivery acknowledgement timeout here

    def _same_loop(self) -> None:
        """MemoryBrokerLoopError when a consumer of the broker runs on another event loop (a sync
        producer's thread, say): its handlers would run on this one, its state shared unlocked."""
        loop = asyncio.get_running_loop()
        for queue in self.broker.queues.values():
            if any(consumer.loop is not loop for consumer in queue.consumers):
                raise MemoryBrokerLoopError(memory_name(self._url))

    async def consume(
        self, queue: str, prefetch: int, handler: Handler, *, ack_timeout: float | None = None
    ) -> MemorySubscription:
        found = self.broker.queues.get(queue)
        if found is None:
            raise UnroutableError(queue)
        consumer = _Consumer(found, prefetch, handler)
        found.consumers.append(consumer)
        self.broker._dispatch(found)
        return MemorySubscription(self.broker, consumer)

    async def follow(self, stream: str, handler: Callable[[Message], None]) -> MemoryFollower:
        found = self.broker.queues.get(stream)
        if found is None or not found.stream:
            raise UnroutableError(stream)
        for message in list(found.log):
            handler(message)
        found.followers.append(handler)
        return MemoryFollower(found, handler)

    async def claim(self, name: str, window: int, marker: Message) -> bool:
        now = self.broker.now()
        if self.broker.claims.get(name, now) > now:
            return False
        self.broker.claims[name] = now + window
        return True

    async def unclaim(self, name: str) -> None:
        self.broker.claims.pop(name, None)

    async def message_count(self, queue: str) -> int:
        found = self.broker.queues.get(queue)
        return len(found.ready) if found is not None else 0

    async def purge(self, queue: str) -> int:
        found = self.broker.queues.get(queue)
        if found is None:
            raise UnroutableError(queue)
        count, found.ready = len(found.ready), []
        return count


_ADDRESSES = itertools.count(1)
