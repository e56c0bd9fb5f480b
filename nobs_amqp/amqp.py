"""The RabbitMQ transport: one robust connection, a pool of confirm channels, consumers."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from . import decoding
from .acks import Acker
from .delivery import AmqpDelivery, DirectQueue
from .errors import (
    BrokerConnectionError,
    BrokerUnavailableError,
    NobsAmqpError,
    NotFoundError,
    PublishError,
    TopologyMismatchError,
    UnroutableError,
)
from .failover import RECONNECT_MAX_SECONDS, FailoverConnection
from .frames import Publisher
from .leases import ExclusiveQueues
from .management import Management
from .message import Message, resent, wall_clock
from .topology import INITIAL_GROUP_SIZE, ExchangeSpec, QueueSpec, ServerVersion, Topology, difference
from .transport import Handler, LeaseState, deadline
from .urls import describe_error as _describe
from .urls import redact as redact  # re-exported: examples and status use them from here
from .urls import vhost_of as vhost_of

log = logging.getLogger("nobs_amqp")

#: RabbitMQ's `consumer_timeout` unless its configuration says otherwise (30 min).
DEFAULT_CONSUMER_TIMEOUT = 1800.0
#: From this version on, a consumer sets its own delivery acknowledgement timeout.
PER_CONSUMER_TIMEOUT = (3, 11, 15)
#: How long closing a subscription waits for the broker to show the messages it gave back.
RETURN_WAIT_SECONDS = 2.0
_CONNECTION_ERRORS = (
    ConnectionError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ChannelClosed,
    asyncio.TimeoutError,
)
#: Channel errors that are the broker's answer, not a lost connection: never retried.
_REFUSALS = (
    aiormq.exceptions.ChannelAccessRefused,
    aiormq.exceptions.ChannelNotFoundEntity,
    aiormq.exceptions.ChannelLockedResource,
    aiormq.exceptions.ChannelPreconditionFailed,
)
_T = TypeVar("_T")
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
    ) -> None:
        self._urls = tuple(urls)
        self._replicas = replicas
        self._name = name
        self._pool_size = pool_size
        self._publish_timeout = publish_timeout
        self._consumer_timeout = consumer_timeout
        self._connection: AbstractRobustConnection | None = None
        self._channels: list[AbstractRobustChannel] = []
        self._publishers: list[Publisher | None] = [None] * pool_size
        self._side: aiormq.abc.AbstractChannel | None = None
        self._next = itertools.cycle(range(pool_size))
        self._url = self._urls[0]
        self._server_version: ServerVersion = (0,)
        self._refusal = ""  # the broker's last answer to a reconnection, said once per outage
        self.on_connection: list[Callable[[bool], None]] = []
        self._leases = ExclusiveQueues()

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def vhost(self) -> str:
        return vhost_of(self._url)

    @property
    def url(self) -> str:
        """The URL of the node the connection reached (of a cluster's list, the one that answered)."""
        return self._url

    def now(self) -> datetime:
        return wall_clock()

    @property
    def server_version(self) -> ServerVersion:
        """The broker's version, as of the last time the connection was up."""
        return self._server_version

    def _read_server_version(self) -> None:
        connection = self._require().transport
        if connection is not None:
            text = str(connection.connection.server_properties.get("version", "0"))
            self._server_version = tuple(int(n) for n in re.findall(r"\d+", text)[:3]) or (0,)

    async def open(self) -> None:
        decoding.install()  # a message whose properties pamqp cannot decode must not kill the connection
        failures: list[str] = []
        last: BaseException | None = None
        for index, url in enumerate(self._urls):
            try:
                connection = await aio_pika.connect_robust(
                    url,
                    client_properties={"connection_name": f"{self._name} {socket.gethostname()} pid {os.getpid()}"},
                    connection_class=FailoverConnection,
                )
                connection.follow(self._urls, index)
                self._connection, self._url = connection, url
                break
            except (ConnectionError, aiormq.exceptions.AMQPError, OSError) as exc:
                last = exc
                failures.append(
                    _login_failure(exc) if len(self._urls) == 1 else f"{redact(url)}: {_login_failure(exc)}"
                )
        else:
            raise BrokerConnectionError(", ".join(redact(u) for u in self._urls), "; ".join(failures)) from last
        self._connection.close_callbacks.add(self._on_lost)
        self._connection.reconnect_callbacks.add(self._on_reconnect)
        self._channels = [
            await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            for _ in range(self._pool_size)
        ]
        self._read_server_version()
        log.debug("connected to %s (RabbitMQ %s)", redact(self._url), self.server_version)

    def _on_lost(self, connection: object, exc: BaseException | None = None) -> None:
        """Said once per outage: aio-pika calls this again for every failed reconnection attempt."""
        if self._connection is None or exc is None:
            return
        if not isinstance(connection, FailoverConnection) or connection.lost_at is not None:
            reason = _describe(exc)
            if isinstance(exc, aiormq.exceptions.AMQPChannelError) and reason != self._refusal:
                self._refusal = reason  # e.g. a queue deleted during the outage: worth saying, once
                log.warning("the broker refused to restore a channel (%s); retrying until it accepts", reason)
            else:
                log.debug("reconnection attempt failed: %s", reason)
            return
        connection.lost_at = connection.loop.time()
        self._tell(False)
        log.warning(
            "lost the connection to %s (%s); reconnecting to %s until one answers (backoff up to %.0f s)",
            redact(self._url),
            _describe(exc),
            "it" if len(self._urls) == 1 else f"the next of {len(self._urls)} nodes",
            RECONNECT_MAX_SECONDS,
        )

    def _on_reconnect(self, connection: object) -> None:
        if isinstance(connection, FailoverConnection):
            self._url = connection.current  # of a cluster, maybe another node than before
        self._read_server_version()
        self._refusal = ""
        self._tell(True)
        if isinstance(connection, FailoverConnection) and connection.lost_at is not None:
            outage = connection.loop.time() - connection.lost_at
            connection.lost_at = None
            log.warning("reconnected to %s after %.1f s", redact(self._url), outage)
        else:
            log.warning("reconnected to %s", redact(self._url))

    def _tell(self, up: bool) -> None:
        for listener in self.on_connection:
            listener(up)

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        self._channels = []
        self._side = None
        if connection is not None:
            await connection.close()

    def _require(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise RuntimeError("transport is not open")
        return self._connection

    def _underlay_connection(self) -> aiormq.abc.AbstractConnection:
        return self._require().transport.connection  # type: ignore[union-attr]

    async def _connected(self) -> aiormq.abc.AbstractConnection:
        """The live underlying connection, once there is one (after a reconnect: the new one)."""
        connection = self._require()
        await connection.ready()
        transport = connection.transport
        if transport is None or transport.connection.is_closed:
            raise ConnectionError("the connection to the broker is being reestablished")
        return transport.connection

    async def _until_reachable(
        self,
        destination: str,
        attempt: Callable[[], Awaitable[_T]],
        pool_index: int | None = None,
    ) -> _T:
        """`attempt()`, again and again while the broker is unreachable or refuses messages for now
        (basic.nack: a quorum queue electing a leader, or full), until the deadline of the queue()
        in progress (else `publish_timeout` from now); then BrokerUnavailableError. After a nack,
        the channel of pool slot `pool_index` is renewed first. A message sent again may be there
        twice (at least once, never lost)."""
        loop = asyncio.get_running_loop()
        until = deadline() or loop.time() + self._publish_timeout
        pause = 0.05
        while True:
            try:
                async with asyncio.timeout_at(until):
                    return await attempt()
            except (*_REFUSALS, aiormq.exceptions.PublishError):  # refused, or returned: the answer
                raise
            except (*_CONNECTION_ERRORS, aiormq.exceptions.DeliveryError) as exc:
                nacked = isinstance(exc, aiormq.exceptions.DeliveryError)
                if loop.time() + pause >= until:
                    raise BrokerUnavailableError(destination, self._unavailable(nacked=nacked)) from exc
                why = "refuses messages (basic.nack)" if nacked else f"is unreachable ({_describe(exc)})"
                log.debug("%s: the broker %s; retrying", destination, why)
                if nacked and pool_index is not None:
                    await self._renew(pool_index)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)

    def _unavailable(self, *, nacked: bool) -> str:
        if nacked:
            return (
                f"the broker refused it (basic.nack) until publish_timeout ({self._publish_timeout:.0f} s) ran out: "
                f"its queue is full (a max-length with reject-publish) or has no leader (on a cluster, most of "
                f"its nodes are down); queue it again once the queue takes messages"
            )
        return (
            f"the broker stayed unreachable for {self._publish_timeout:.0f} s (publish_timeout); "
            f"check that RabbitMQ is up and reachable, then queue it again"
        )

    # -- declare -----------------------------------------------------------------------------

    async def declare(self, topology: Topology) -> None:
        """Declare every object; while the broker is unreachable, retry (all of it) until the deadline."""
        first = (topology.queues or topology.exchanges or (None,))[0]
        await self._until_reachable(first.name if first is not None else "?", lambda: self._declare(topology))

    async def _declare(self, topology: Topology) -> None:
        raw = await (await self._connected()).channel(publisher_confirms=False)
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
        raw = await (await self._connected()).channel(publisher_confirms=False)  # the refusal closed the other
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
            existing = await Management(self._url, timeout=3).get(kind, self.vhost, declared.name)
        except NobsAmqpError:
            existing = None
        if existing is not None:
            detail = difference(declared.arguments, existing.get("arguments") or {}) or detail
        return TopologyMismatchError(kind, declared.name, self.vhost, detail)

    # -- publish -----------------------------------------------------------------------------

    async def publish(self, exchange: str, routing_key: str, message: Message) -> None:
        index = next(self._next)
        channel = self._channels[index] if self._channels else None
        if channel is None:
            raise RuntimeError("transport is not open")
        destination = exchange or routing_key

        sends = 0

        async def attempt() -> object:
            nonlocal sends
            sends += 1  # after a send that was not confirmed, the broker may hold it already
            sent = message if sends == 1 else resent(message)
            return await (await self._publisher(index, channel)).publish(exchange, routing_key, sent)

        try:
            confirmation = await self._until_reachable(destination, attempt, index)
        except aiormq.exceptions.PublishError as exc:
            raise UnroutableError(destination) from exc
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise NotFoundError(destination, _describe(exc)) from exc
        except aiormq.exceptions.ChannelAccessRefused as exc:
            raise PublishError(destination, f"the broker refused access (403): {_describe(exc)}") from exc
        except _REFUSALS as exc:
            raise PublishError(destination, f"the broker closed the channel: {_describe(exc)}") from exc
        if not isinstance(confirmation, Basic.Ack):
            raise PublishError(destination, f"unexpected confirmation {confirmation!r}")

    async def _renew(self, index: int) -> None:
        """RabbitMQ 3.10 goes on nacking a channel that was nacked while a quorum queue elected its
        leader (a node died); a new channel is not: close pool channel `index`'s, aio-pika opens
        another (and `_publisher` makes a publisher for it)."""
        publisher = self._publishers[index]
        if publisher is not None and not publisher.channel.is_closed:
            with contextlib.suppress(*_CONNECTION_ERRORS):
                await publisher.channel.close()

    async def _publisher(self, index: int, channel: AbstractRobustChannel) -> Publisher:
        """The publisher of pool channel `index`, on its current aiormq channel."""
        publisher = self._publishers[index]
        if publisher is None or publisher.channel.is_closed:
            raw = cast(aiormq.Channel, await channel.get_underlay_channel())
            if publisher is None or publisher.channel is not raw:  # a new channel after a reconnection
                publisher = self._publishers[index] = Publisher(raw)
        return publisher

    # -- consume -----------------------------------------------------------------------------

    def fixed_ack_timeout(self) -> float | None:
        """RabbitMQ 3.11.15 and later take a consumer's own `x-consumer-timeout`; older ones apply
        their `consumer_timeout` (30 min unless its rabbitmq.conf says otherwise: tell the
        project with `Project(broker_consumer_timeout=...)`)."""
        return None if self.server_version >= PER_CONSUMER_TIMEOUT else self._consumer_timeout

    async def consume(
        self, queue: str, prefetch: int, handler: Handler, *, ack_timeout: float | None = None
    ) -> _AmqpSubscription:
        channel = await self._require().channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=prefetch)
        channel.QUEUE_CLASS = DirectQueue  # this channel's queues only
        declared = cast(DirectQueue, await channel.declare_queue(queue, passive=True))

        subscription = _AmqpSubscription(channel, declared, prefetch, lambda: self.message_count(queue))

        async def on_message(delivered: DeliveredMessage) -> None:
            tag = cast(Basic.Deliver, delivered.delivery).delivery_tag or 0
            await handler(AmqpDelivery(delivered, queue, tag, subscription.acker(delivered.channel, tag)))

        arguments: dict[str, Any] = {}
        if ack_timeout is not None and self.fixed_ack_timeout() is None:
            arguments["x-consumer-timeout"] = int(ack_timeout * 1000)
        subscription.tag = await declared.consume(on_message, no_ack=False, arguments=arguments or None)
        return subscription

    async def message_count(self, queue: str) -> int:
        result = await (await self._side_channel()).queue_declare(queue, passive=True)
        return int(result.message_count or 0)

    async def purge(self, queue: str) -> int:
        result = await (await self._side_channel()).queue_purge(queue)
        return int(result.message_count or 0)

    async def lease(self, name: str) -> LeaseState:
        """An exclusive queue named `name` (see `leases.py`)."""
        try:
            return await self._leases.lease(await self._connected(), name)
        except _REFUSALS as exc:
            raise BrokerConnectionError(
                redact(self._url), f"the broker refused queue {name!r}: {_describe(exc)}"
            ) from exc
        except _CONNECTION_ERRORS as exc:
            raise BrokerConnectionError(redact(self._url), _describe(exc)) from exc

    async def release(self, name: str) -> None:
        transport = self._connection.transport if self._connection is not None else None
        if transport is not None:
            try:
                await self._leases.release(transport.connection, name)
            except _CONNECTION_ERRORS as exc:  # the connection is gone, and its queue with it
                log.debug("releasing %s: %s", name, _describe(exc))

    async def _side_channel(self) -> aiormq.abc.AbstractChannel:
        """One channel for passive declares and purges (burst and drain poll them), reopened
        after an error such as a missing queue closed it."""
        if self._side is None or self._side.is_closed:
            connection = await self._connected()  # after a reconnect: the new connection
            self._side = await connection.channel(publisher_confirms=False)
        return self._side


class _AmqpSubscription:
    def __init__(
        self,
        channel: AbstractRobustChannel,
        queue: aio_pika.abc.AbstractQueue,
        prefetch: int,
        count: Callable[[], Awaitable[int]],
    ) -> None:
        self._prefetch = prefetch
        self._channel = channel
        self._queue = queue
        self._count = count
        self.tag = ""
        self._acker: Acker | None = None

    def acker(self, channel: aiormq.abc.AbstractChannel, tag: int) -> Acker:
        """The acker of `channel` (a new one after a reconnect), with delivery `tag` registered."""
        if self._acker is None or self._acker.channel is not channel:
            self._acker = Acker(channel, self._prefetch)
        self._acker.delivered(tag)
        return self._acker

    async def cancel(self) -> None:
        if not self._channel.is_closed:
            try:
                await self._queue.cancel(self.tag)
            except _CONNECTION_ERRORS as exc:
                log.debug("cancel of consumer %s failed: %s", self.tag, _describe(exc))

    async def flush(self) -> None:
        if self._acker is not None:
            await self._acker.flush()

    async def close(self) -> None:
        """Send pending acks, then close the channel: the broker returns every message still
        unsettled. It puts them back asynchronously: wait (up to RETURN_WAIT_SECONDS) until the
        queue shows them, so a count or a read right after this sees the queue as it was."""
        await self.flush()
        if self._channel.is_closed:
            return
        held = self._acker.held if self._acker is not None else 0
        before = await self._count() if held else 0
        await self._channel.close()
        if held:
            await self._returned(before + held)

    async def _returned(self, expected: int) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + RETURN_WAIT_SECONDS
        try:
            while await self._count() < expected and loop.time() < until:  # noqa: ASYNC110 - the broker sends no event when a return lands
                await asyncio.sleep(0.01)
        except _CONNECTION_ERRORS + _REFUSALS as exc:  # gone or deleted meanwhile: nothing to wait for
            log.debug("cannot count %s after giving messages back: %s", self._queue.name, _describe(exc))


def _table(arguments: Mapping[str, object]) -> aiormq.abc.ArgumentsType:
    return cast(aiormq.abc.ArgumentsType, dict(arguments))


def _login_failure(exc: BaseException) -> str:
    text = _describe(exc)
    if "Connection.Close" in text:
        return "the broker closed the connection at login: the vhost does not exist or the user may not use it"
    if isinstance(exc, ssl.SSLError) or "CERTIFICATE_VERIFY_FAILED" in text:
        return (
            f"{text}; the broker's TLS certificate was not accepted: give its CA with ?cafile=/path/ca.pem "
            f"in the amqps:// URL and connect by a host name the certificate names"
        )
    return text
