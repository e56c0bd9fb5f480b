"""The RabbitMQ transport: a publishing connection with a pool of confirm channels, and (once it
consumes) a consuming connection for consumers, acks, declarations and leases (`link.py` says
why two)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any, cast

import aiormq
from aio_pika.abc import AbstractRobustChannel
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from ...errors import (
    BrokerBlockedError,
    BrokerConnectionError,
    BrokerUnavailableError,
    NobsAmqpError,
    TopologyMismatchError,
)
from ...management import Management
from ...message import DIRECT_REPLY_TO, Message, wall_clock
from ...topology import INITIAL_GROUP_SIZE, ExchangeSpec, QueueSpec, ServerVersion, Topology, difference
from ...urls import describe_error as _describe
from ...urls import redact, vhost_of
from ..base import DEFAULT_HEARTBEAT, Delivery, Handler, Inbox, LeaseState, check_size, deadline
from . import decoding
from .claims import ClaimQueues
from .delivery import AmqpDelivery, DirectQueue
from .frames import Publisher
from .leases import ExclusiveQueues
from .link import PUBLISHING, Link
from .permits import take_permit
from .replies import Requests
from .sending import CONNECTION_ERRORS, REFUSALS, Sending
from .subscription import AmqpSubscription

log = logging.getLogger("nobs_amqp")

#: RabbitMQ's `consumer_timeout` unless its configuration says otherwise (30 min).
DEFAULT_CONSUMER_TIMEOUT = 1800.0
#: From this version on, a consumer sets its own delivery acknowledgement timeout (`x-consumer-timeout`).
PER_CONSUMER_TIMEOUT = (3, 11, 15)
#: Unsettled messages a stream's follower takes at once (it acks each as soon as it has read it).
FOLLOW_PREFETCH = 100
#: In that error's detail, the existing queue's value: "but current is '1'", "but current is the
#: value '1' of type 'long'", or "but current is none".
_EXISTING_VALUE = re.compile(r"current is (?:the value )?'(\d+)'")
_INEQUIVALENT = re.compile(r"inequivalent arg '([^']+)' for (queue|exchange) '([^']+)' in vhost '([^']*)': (.*)")


class AmqpTransport:
    """Talks to RabbitMQ through aio-pika. Constructing it does no I/O."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        name: str,
        pool_size: int = 4,
        publish_timeout: float = 30.0,
        consumer_timeout: float = DEFAULT_CONSUMER_TIMEOUT,
        replicas: int = 3,
        heartbeat: int = DEFAULT_HEARTBEAT,
        max_message_size: int | None = None,
    ) -> None:
        self._replicas = replicas
        self._pool_size = pool_size
        self._publish_timeout = publish_timeout
        self._consumer_timeout = consumer_timeout
        self._max_message_size = max_message_size
        links = {"urls": urls, "name": name, "heartbeat": heartbeat, "on_change": self._changed}
        self._out = Link(role=PUBLISHING, **links)  # type: ignore[arg-type]
        self._in = Link(role="consuming", **links)  # type: ignore[arg-type]
        self._opening_in = asyncio.Lock()
        self._channels: list[AbstractRobustChannel] = []
        self._publishers: list[Publisher | None] = [None] * pool_size
        self._side: aiormq.abc.AbstractChannel | None = None
        self._next = itertools.cycle(range(pool_size))
        self._server_version: ServerVersion = (0,)
        self._told: tuple[bool, str | None] = (True, None)
        self._lost_at = 0.0
        #: Told False when a connection is lost (once per outage), True when all are back.
        self.on_connection: list[Callable[[bool], None]] = []
        #: Told the broker's reason when it blocks the publishing connection, None when it unblocks it.
        self.on_blocked: list[Callable[[str | None], None]] = []
        self._leases = ExclusiveQueues()
        self._claims = ClaimQueues()
        #: Publishes that ask for a reply go on a channel of their own (index `pool_size`).
        self._requests = Requests(self._out)

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def vhost(self) -> str:
        return vhost_of(self._out.url)

    @property
    def url(self) -> str:
        """The URL of the node the connection reached (of a cluster's list, the one that answered)."""
        return self._out.url

    @property
    def blocked(self) -> str | None:
        """Why the broker blocks publishing here now (its reason), or None."""
        return self._out.blocked

    def check_size(self, destination: str, message: Message) -> None:
        """MessageTooLargeError for a body over the project's limit, else over the broker's default."""
        check_size(destination, message, self._max_message_size, self.server_version)

    def now(self) -> datetime:
        return wall_clock()

    @property
    def server_version(self) -> ServerVersion:
        """The broker's version, as of the last time the connection was up."""
        return self._server_version

    def _read_server_version(self, link: Link) -> None:
        connection = link.connection.transport if link.connection is not None else None
        if connection is not None:
            text = str(connection.connection.server_properties.get("version", "0"))
            self._server_version = tuple(int(n) for n in re.findall(r"\d+", text)[:3]) or (0,)

    async def open(self) -> None:
        decoding.install()  # a message whose properties pamqp cannot decode must not kill the connection
        connection = await self._out.open()
        try:
            self._channels = [
                await connection.channel(publisher_confirms=True, on_return_raises=True) for _ in range(self._pool_size)
            ]
        except BaseException:
            await self._out.close()
            raise
        self._read_server_version(self._out)
        log.debug("connected to %s (RabbitMQ %s)", redact(self.url), self.server_version)

    async def _consuming(self) -> Link:
        """The consuming connection, opened the first time it is needed."""
        if self._in.connection is None:
            async with self._opening_in:
                if self._in.connection is None:
                    if self._out.connection is None:
                        raise RuntimeError("transport is not open")
                    await self._in.open()
        return self._in

    def _control(self) -> Link:
        """Where declarations and counts go: the consuming connection once it is open (the
        broker blocks the publishing one during an alarm, and with it every round trip on it)."""
        return self._in if self._in.connection is not None else self._out

    def _changed(self) -> None:
        """A connection was lost, came back, or was blocked or unblocked: say so once per outage
        (the first connection lost, until all are back) and once per alarm."""
        links = [link for link in (self._out, self._in) if link.connection is not None]
        down = [link for link in links if not link.up]
        if not down:
            self._read_server_version(self._out)
        told = (not down, self._out.blocked)
        if told == self._told:
            return
        (was_up, was_blocked), self._told = self._told, told
        loop = asyncio.get_running_loop()
        if was_up and down:
            self._lost_at = loop.time()
            log.warning("%s", down[0].describe_loss())
        elif not was_up and not down:
            log.warning("reconnected to %s after %.1f s", redact(self.url), loop.time() - self._lost_at)
        if told[0] != was_up:
            for listener in self.on_connection:
                listener(told[0])
        if told[1] != was_blocked:
            for blocked in self.on_blocked:
                blocked(told[1])

    async def close(self) -> None:
        self._channels = []
        self._side = None
        self._requests.close()
        await self._in.close()
        await self._out.close()

    def unavailable(self, *, nacked: bool) -> str:
        """Why a publish or declaration that reached its deadline was not sent, and what to do."""
        if nacked:
            return (
                f"the broker refused it (basic.nack) until publish_timeout ({self._publish_timeout:.0f} s) ran out: "
                f"its queue is full (a max-length with reject-publish) or has no leader (on a cluster, most of "
                f"its nodes are down); nothing was queued: queue it again once the queue takes messages"
            )
        return (
            f"the broker stayed unreachable for {self._publish_timeout:.0f} s (publish_timeout); nothing was "
            f"sent: check that RabbitMQ is up and reachable, then queue it again"
        )

    # -- declare -----------------------------------------------------------------------------

    async def declare(self, topology: Topology) -> None:
        """Declare every object; while the broker is unreachable, retry (all of it) until the deadline."""
        first = (topology.queues or topology.exchanges or (None,))[0]
        name = first.name if first is not None else "?"
        loop = asyncio.get_running_loop()
        until = deadline() or loop.time() + self._publish_timeout
        pause = 0.05
        while True:
            try:
                async with asyncio.timeout_at(until):
                    return await self._declare(topology)
            except REFUSALS:
                raise
            except CONNECTION_ERRORS as exc:
                if loop.time() + pause >= until:
                    blocked = self._control().blocked
                    if blocked is not None:  # an alarm: the broker reads nothing more from that connection
                        raise BrokerBlockedError(name, blocked, self._publish_timeout) from exc
                    raise BrokerUnavailableError(name, self.unavailable(nacked=False)) from exc
                log.debug("%s: the broker is unreachable (%s); retrying", name, _describe(exc))
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)

    async def _declare(self, topology: Topology) -> None:
        raw = await (await self._control().connected()).channel(publisher_confirms=False)
        current: ExchangeSpec | QueueSpec | None = None
        try:
            for current in topology.exchanges:
                await raw.exchange_declare(
                    current.name, exchange_type=current.type, durable=True, arguments=_table(current.arguments)
                )
            for current in topology.queues:
                raw = await self._declare_queue(raw, current)
            for binding in topology.bindings:
                if binding.to_exchange:
                    await raw.exchange_bind(binding.destination, binding.source, binding.routing_key)
                else:
                    await raw.queue_bind(binding.destination, binding.source, binding.routing_key)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise await self._mismatch(current, exc) from exc
        finally:
            if not raw.is_closed:
                await raw.close()

    async def _declare_queue(self, raw: aiormq.abc.AbstractChannel, queue: QueueSpec) -> aiormq.abc.AbstractChannel:
        """Declare `queue`, a quorum one replicated to `replicas` nodes if it is new. One that exists
        keeps its members (created before, or with another count): it is declared again with the
        count it has, so its other arguments are still checked. Returns the channel to go on with."""
        arguments = dict(queue.arguments)
        if arguments.get("x-queue-type") != "quorum":
            await raw.queue_declare(queue.name, durable=True, arguments=_table(arguments))
            return raw
        try:
            await raw.queue_declare(
                queue.name, durable=True, arguments=_table({**arguments, INITIAL_GROUP_SIZE: self._replicas})
            )
            return raw
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            found = _INEQUIVALENT.search(str(exc.args[0] if exc.args else exc))
            if found is None or found.group(1) != INITIAL_GROUP_SIZE:
                raise
            has = _EXISTING_VALUE.search(found.group(5))
        log.debug("queue %s exists with %s replicas: it keeps them", queue.name, has.group(1) if has else "unset")
        # The refusal closed the other channel.
        raw = await (await self._control().connected()).channel(publisher_confirms=False)
        if has is not None:
            arguments[INITIAL_GROUP_SIZE] = int(has.group(1))
        await raw.queue_declare(queue.name, durable=True, arguments=_table(arguments))
        return raw

    async def _mismatch(
        self, declared: ExchangeSpec | QueueSpec | None, exc: aiormq.exceptions.ChannelPreconditionFailed
    ) -> TopologyMismatchError:
        """Name the object and every argument that differs (all of them when the management API answers)."""
        text = str(exc.args[0] if exc.args else exc)
        found = _INEQUIVALENT.search(text)
        detail = f"{found.group(1)}: {found.group(5).rstrip(')')}" if found else text
        if declared is None:
            return TopologyMismatchError("object", "?", self.vhost, detail)
        kind = "exchange" if isinstance(declared, ExchangeSpec) else "queue"
        try:
            existing = await Management(self.url, timeout=3).get(kind, self.vhost, declared.name)
        except NobsAmqpError:
            existing = None
        if existing is not None:
            detail = difference(declared.arguments, existing.get("arguments") or {}) or detail
        return TopologyMismatchError(kind, declared.name, self.vhost, detail)

    # -- publish -----------------------------------------------------------------------------

    async def publish(self, exchange: str, routing_key: str, message: Message) -> None:
        """Publish and wait for the confirm (`sending.Sending` says what happens on the way)."""
        if not self._channels:
            raise RuntimeError("transport is not open")
        index = next(self._next)
        await Sending(self, index, exchange, routing_key, message).run()

    async def take_permit(self, queue: str) -> bool:
        """One transient marker into rate limiter `queue` (`permits.take_permit`)."""
        if not self._channels:
            raise RuntimeError("transport is not open")
        return await take_permit(self, next(self._next), queue)

    async def request(self, exchange: str, routing_key: str, message: Message, inbox: Inbox) -> None:
        """Publish as `publish` does, on the requests channel, asking for a reply (`replies.py`)."""
        if not self._channels:
            raise RuntimeError("transport is not open")
        self._requests.inbox = inbox
        asking = replace(message, reply_to=DIRECT_REPLY_TO)
        await Sending(self, self._pool_size, exchange, routing_key, asking).run()

    async def reply(self, address: str, reply: Message) -> None:
        await self._requests.reply(address, reply)

    async def renew(self, index: int) -> None:
        """RabbitMQ 3.10 goes on nacking a channel that was nacked while a quorum queue elected its
        leader (a node died); a new channel is not: close pool channel `index`'s, aio-pika opens
        another (and `publisher` makes a publisher for it)."""
        if index == self._pool_size:
            await self._requests.renew()
            return
        publisher = self._publishers[index]
        if publisher is not None and not publisher.channel.is_closed:
            with contextlib.suppress(*CONNECTION_ERRORS):
                await publisher.channel.close()

    async def publisher(self, index: int) -> Publisher:
        """The publisher of pool channel `index`, on its current aiormq channel, once the broker
        does not block publishing (waits for that)."""
        await self._out.until_unblocked()
        if index == self._pool_size:
            return await self._requests.publisher()
        publisher = self._publishers[index]
        if publisher is None or publisher.channel.is_closed:
            raw = cast(aiormq.Channel, await self._channels[index].get_underlay_channel())
            if publisher is None or publisher.channel is not raw:  # a new channel after a reconnection
                publisher = self._publishers[index] = Publisher(raw)
        return publisher

    async def until_unblocked(self) -> None:
        """Return once the broker does not block publishing (at once, unless an alarm is on)."""
        await self._out.until_unblocked()

    @property
    def publish_timeout(self) -> float:
        return self._publish_timeout

    # -- consume -----------------------------------------------------------------------------

    def fixed_ack_timeout(self) -> float | None:
        """RabbitMQ 3.11.15 and later take a consumer's own `x-consumer-timeout`; older ones apply
        their `consumer_timeout` (30 min unless its rabbitmq.conf says otherwise: tell the
        project with `Project(broker_consumer_timeout=...)`)."""
        return None if self.server_version >= PER_CONSUMER_TIMEOUT else self._consumer_timeout

    async def consume(
        self,
        queue: str,
        prefetch: int,
        handler: Handler,
        *,
        ack_timeout: float | None = None,
        offset: str | None = None,
    ) -> AmqpSubscription:
        link = await self._consuming()
        channel = await link.require().channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=prefetch)
        channel.QUEUE_CLASS = DirectQueue  # this channel's queues only
        declared = cast(DirectQueue, await channel.declare_queue(queue, passive=True))

        subscription = AmqpSubscription(channel, declared, prefetch, lambda: self.message_count(queue))

        async def on_message(delivered: DeliveredMessage) -> None:
            tag = cast(Basic.Deliver, delivered.delivery).delivery_tag or 0
            await handler(AmqpDelivery(delivered, queue, tag, subscription.acker(delivered.channel, tag)))

        arguments: dict[str, Any] = {}
        if ack_timeout is not None and self.fixed_ack_timeout() is None:
            arguments["x-consumer-timeout"] = int(ack_timeout * 1000)
        if offset is not None:  # a stream: where to start reading it
            arguments["x-stream-offset"] = offset
        subscription.tag = await declared.consume(on_message, no_ack=False, arguments=arguments or None)
        return subscription

    async def follow(self, stream: str, handler: Callable[[Message], None]) -> AmqpSubscription:
        """Every message of `stream` from its first on (again from the first after a reconnect)."""

        async def each(delivery: Delivery) -> None:
            handler(delivery.message)
            await delivery.ack()  # a stream keeps it: the ack only gives the consumer credit

        return await self.consume(stream, FOLLOW_PREFETCH, each, offset="first")

    async def claim(self, name: str, window: int, marker: Message) -> bool:
        """Take claim `name` for `window` seconds unless someone holds it (see `claims.py`); on the
        publishing connection (a claim is a publish: an alarm holds it back)."""
        loop = asyncio.get_running_loop()
        until = deadline() or loop.time() + self._publish_timeout
        try:
            async with asyncio.timeout_at(until):
                return await self._claims.claim(await self._out.connected(), name, window, marker)
        except REFUSALS as exc:
            raise BrokerConnectionError(
                redact(self.url), f"the broker refused claim {name!r}: {_describe(exc)}"
            ) from exc
        except (*CONNECTION_ERRORS, TimeoutError) as exc:
            raise BrokerUnavailableError(
                name,
                f"the broker stayed unreachable for {self._publish_timeout:.0f} s (publish_timeout) while taking the "
                f"claim; the task was not sent, and the claim may be taken for its window: queue it again without "
                f"unique=, or once the window is over",
            ) from exc

    async def unclaim(self, name: str) -> None:
        with contextlib.suppress(*CONNECTION_ERRORS, *REFUSALS, TimeoutError):
            async with asyncio.timeout(self._publish_timeout):
                await self._claims.unclaim(await self._out.connected(), name)

    async def message_count(self, queue: str) -> int:
        result = await (await self._side_channel()).queue_declare(queue, passive=True)
        return int(result.message_count or 0)

    async def purge(self, queue: str) -> int:
        result = await (await self._side_channel()).queue_purge(queue)
        return int(result.message_count or 0)

    async def lease(self, name: str) -> LeaseState:
        """An exclusive queue named `name` (see `leases.py`), on the consuming connection (never blocked)."""
        link = await self._consuming()
        try:
            return await self._leases.lease(await link.connected(), name)
        except REFUSALS as exc:
            raise BrokerConnectionError(
                redact(self.url), f"the broker refused queue {name!r}: {_describe(exc)}"
            ) from exc
        except CONNECTION_ERRORS as exc:
            raise BrokerConnectionError(redact(self.url), _describe(exc)) from exc

    async def release(self, name: str) -> None:
        transport = self._in.connection.transport if self._in.connection is not None else None
        if transport is not None:
            try:
                await self._leases.release(transport.connection, name)
            except CONNECTION_ERRORS as exc:  # the connection is gone, and its queue with it
                log.debug("releasing %s: %s", name, _describe(exc))

    async def _side_channel(self) -> aiormq.abc.AbstractChannel:
        """One channel for passive declares and purges (burst and drain poll them), reopened
        after an error such as a missing queue closed it, or on the consuming connection once
        that is open."""
        connection = await self._control().connected()  # after a reconnect: the new connection
        if self._side is None or self._side.is_closed or self._side.connection is not connection:
            self._side = await connection.channel(publisher_confirms=False)
        return self._side


def _table(arguments: Mapping[str, object]) -> aiormq.abc.ArgumentsType:
    return cast(aiormq.abc.ArgumentsType, dict(arguments))
