"""Requests and replies on RabbitMQ: direct reply-to, no queue made for it.

A caller that awaits a task's result publishes the task on one channel of the publishing
connection that consumes RabbitMQ's `amq.rabbitmq.reply-to` pseudo-queue (no-ack, before it
publishes, on the same channel: what direct reply-to asks), with `reply_to` set to it; the
broker rewrites that to an address of the channel, and a worker's reply to that address comes
straight to the consumer. The channel confirms publishes as the pool's do. When it closes (the
connection dropped, or the broker closed it) the replies to what was sent on it can no longer
come: the inbox is told at once, so nobody waits for them until a timeout.

Replies go out on another channel, without confirms, transient and not mandatory, and only to
a direct reply-to address on the default exchange: never to a queue or an exchange, whatever
a message's `reply_to` says. One that cannot be delivered costs nothing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

import aiormq
from aio_pika.abc import AbstractRobustChannel
from aiormq.abc import DeliveredMessage

from ...message import DIRECT_REPLY_TO, Message, is_reply_address
from ...urls import describe_error
from ..base import Inbox
from .delivery import message_of
from .frames import Publisher, pamqp_properties
from .link import Link
from .sending import CONNECTION_ERRORS, REFUSALS

log = logging.getLogger("nobs_amqp")

TRANSIENT = 1
#: How long a reply may take to be written (a blocked or stalled connection): then it is dropped.
REPLY_SECONDS = 5.0


class Requests:
    """The channel requests are published on (consuming their replies), and the one replies go on."""

    def __init__(self, link: Link) -> None:
        self._link = link
        self._lock = asyncio.Lock()
        self._channel: AbstractRobustChannel | None = None
        self._publisher: Publisher | None = None
        self._replies: aiormq.abc.AbstractChannel | None = None
        #: Who is told of replies (the session's results).
        self.inbox: Inbox | None = None

    async def publisher(self) -> Publisher:
        """The publisher of the requests channel, consuming direct replies (again, on a new channel
        after a reconnection) before anything is published on it."""
        async with self._lock:
            if self._channel is None:
                self._channel = await self._link.require().channel(publisher_confirms=True, on_return_raises=True)
            publisher = self._publisher
            if publisher is None or publisher.channel.is_closed:
                raw = cast(aiormq.Channel, await self._channel.get_underlay_channel())
                if publisher is None or publisher.channel is not raw:
                    await raw.basic_consume(DIRECT_REPLY_TO, self._on_reply, no_ack=True)
                    raw.closing.add_done_callback(self._closed)
                    publisher = self._publisher = Publisher(raw)
        return publisher

    async def renew(self) -> None:
        """Close the requests channel (a nacking one: see `AmqpTransport.renew`); it is made again."""
        publisher = self._publisher
        if publisher is not None and not publisher.channel.is_closed:
            try:
                await publisher.channel.close()
            except CONNECTION_ERRORS as exc:
                log.debug("closing the requests channel: %s", describe_error(exc))

    def close(self) -> None:
        self._channel = self._publisher = self._replies = None

    async def _on_reply(self, delivered: DeliveredMessage) -> None:
        if self.inbox is not None:
            self.inbox.replied(message_of(delivered))

    def _closed(self, closing: asyncio.Future[object]) -> None:
        if not closing.cancelled():
            closing.exception()  # retrieved: the reason is the link's to report
        if self.inbox is not None:
            self.inbox.lost("the channel that would receive them closed (the connection dropped or was closed)")

    async def reply(self, address: str, reply: Message) -> None:
        """Send `reply` to the direct reply-to `address`; dropped (logged) if it cannot go."""
        if not is_reply_address(address):
            log.warning("refused to reply to %r: not a direct reply-to address", address)
            return
        properties = pamqp_properties(reply, delivery_mode=TRANSIENT)
        try:
            async with asyncio.timeout(REPLY_SECONDS):
                channel = await self._replies_channel()
                await channel.basic_publish(reply.body, exchange="", routing_key=address, properties=properties)
        except (*CONNECTION_ERRORS, *REFUSALS, aiormq.exceptions.AMQPError) as exc:
            log.debug("a reply to %s was not sent: %s", address, describe_error(exc))

    async def _replies_channel(self) -> aiormq.abc.AbstractChannel:
        connection = await self._link.connected()
        if self._replies is None or self._replies.is_closed or self._replies.connection is not connection:
            self._replies = await connection.channel(publisher_confirms=False)
        return self._replies
