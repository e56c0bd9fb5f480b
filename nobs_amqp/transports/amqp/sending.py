"""One publish on RabbitMQ, from the size check to the broker's confirm, and what a raise means.

A publish is retried while the broker is unreachable, nacks it (a quorum queue electing a
leader, a full queue), or closed its channel because of another message; it gives up at the
deadline of the `queue()` (or copy) in progress, else `publish_timeout` from its start. What it
raises then says whether the message may be in the queue all the same:

- `BrokerUnavailableError` (`BrokerBlockedError` during a resource alarm): nothing was sent, or
  the broker refused what was; queueing it again makes no second message.
- `PublishUnconfirmedError` (`maybe_sent`): some send of it was written and never confirmed: the
  connection dropped or stalled after it, or the broker blocked the connection (an alarm: it
  takes the message once the alarm clears). Its message id is in the error.

A send after the first carries `x-nobs-resent` (a worker that settled that attempt acks it
unrun). Inside `transport.until_confirmed()` (a worker placing a retry or dead letter) a publish
that may be in the queue is never given up: it is waited for and sent again until confirmed.
A message larger than the broker takes is refused before anything is sent.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Protocol

import aiormq
from pamqp.commands import Basic

from ...errors import (
    BrokerBlockedError,
    BrokerUnavailableError,
    MessageTooLargeError,
    NotFoundError,
    PublishError,
    PublishUnconfirmedError,
    UnroutableError,
)
from ...message import Message, resent
from ...urls import describe_error
from ..base import deadline, pursued
from .frames import Publisher

log = logging.getLogger("nobs_amqp")

#: Refusals of a channel another publish caused that a publish sends again, at most (then it is its own).
INNOCENT_TRIES = 3

CONNECTION_ERRORS = (
    ConnectionError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ChannelClosed,
    asyncio.TimeoutError,
)
#: Channel errors that are the broker's answer, not a lost connection: never retried as such.
REFUSALS = (
    aiormq.exceptions.ChannelAccessRefused,
    aiormq.exceptions.ChannelNotFoundEntity,
    aiormq.exceptions.ChannelLockedResource,
    aiormq.exceptions.ChannelPreconditionFailed,
)
_Confirmation = Basic.Ack | Basic.Nack | Basic.Reject | None
_SIZE = re.compile(r"message size (\d+) is larger than configured max size (\d+)")
_EXCHANGE = re.compile(r"(?:no exchange|access to exchange) '([^']*)'")


class Channels(Protocol):
    """What a `Sending` needs of the transport that owns the publishing connection."""

    @property
    def blocked(self) -> str | None: ...
    @property
    def publish_timeout(self) -> float: ...
    def check_size(self, destination: str, message: Message) -> None: ...
    def unavailable(self, *, nacked: bool) -> str: ...
    async def until_unblocked(self) -> None: ...
    async def publisher(self, index: int) -> Publisher: ...
    async def renew(self, index: int) -> None: ...


class Sending:
    """Publishes `message` through pool channel `index` of `transport` until confirmed."""

    def __init__(self, transport: Channels, index: int, exchange: str, routing_key: str, message: Message) -> None:
        self.transport = transport
        self.index = index
        self.exchange = exchange
        self.routing_key = routing_key
        self.message = message
        self.destination = exchange or routing_key
        self.sends = 0
        #: Some send was written and not refused: the message may be in the queue.
        self.uncertain = False
        self._innocent = 0

    async def run(self) -> None:
        try:
            await self._run()
        except PublishError as exc:
            if exc.message_id is None:
                exc.message_id = self.message.message_id or None
            raise

    async def _run(self) -> None:
        self.transport.check_size(self.destination, self.message)
        loop = asyncio.get_running_loop()
        until = deadline() or loop.time() + self.transport.publish_timeout
        pursue = pursued()
        pause = 0.05
        while True:
            nacked = False
            try:
                confirmation = await self._attempt(None if pursue and self.uncertain else until, pursue)
            except REFUSALS as exc:
                self._refused(exc)  # raises, unless another publish caused it
                failure: BaseException = exc
            except aiormq.exceptions.PublishError as exc:  # returned: no queue took it
                raise UnroutableError(self.destination) from exc
            except aiormq.exceptions.DeliveryError as exc:  # basic.nack: not taken
                nacked, failure = True, exc
                await self.transport.renew(self.index)
            except CONNECTION_ERRORS as exc:
                failure = exc
            else:
                if not isinstance(confirmation, Basic.Ack):
                    raise PublishError(self.destination, f"unexpected confirmation {confirmation!r}")
                return
            if loop.time() + pause >= until and not (pursue and self.uncertain):
                raise self._gave_up(nacked) from failure
            why = "refuses messages (basic.nack)" if nacked else f"is unreachable ({describe_error(failure)})"
            log.debug("%s: the broker %s; sending it again", self.destination, why)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    async def _attempt(self, until: float | None, pursue: bool) -> object:
        """One send: wait (up to `until`) until the broker does not block publishing and the
        channel is open, send, and wait for the confirm (past `until` when `pursue`). When
        `pursue`, a broker that blocks publishing is waited for past `until` too: it is up, and
        takes the message once its alarm clears (a worker's delivery waits meanwhile)."""
        if pursue:
            await self.transport.until_unblocked()
        async with asyncio.timeout_at(until):
            publisher = await self.transport.publisher(self.index)
        sent = self.message if self.sends == 0 else resent(self.message)
        confirmation = publisher.send(self.exchange, self.routing_key, sent)  # raises if not sent
        self.sends += 1
        earlier, self.uncertain = self.uncertain, True
        try:
            return await self._confirmed(confirmation, until, pursue)
        except aiormq.exceptions.DeliveryError:
            self.uncertain = earlier  # nacked: this send is not in the queue (an earlier one may be)
            raise

    async def _confirmed(
        self, confirmation: asyncio.Future[_Confirmation], until: float | None, pursue: bool
    ) -> object:
        try:
            async with asyncio.timeout_at(until):
                return await _settled(confirmation)
        except TimeoutError:
            if not pursue:
                raise
        log.warning(
            "%s: message %s is not confirmed yet (%s); waiting for it, as its delivery waits",
            self.destination,
            self.message.message_id,
            self._why(),
        )
        return await _settled(confirmation)

    def _refused(self, exc: BaseException) -> None:
        """The broker closed the channel: raise what it means for this message, unless another
        publish of the channel caused it (this one is sent again on a new channel)."""
        text = describe_error(exc)
        size = _SIZE.search(text)
        named = _EXCHANGE.search(text)
        caused_by_other = (size is not None and int(size.group(1)) != len(self.message.body)) or (
            named is not None and named.group(1) != self.exchange
        )
        if caused_by_other and self._innocent < INNOCENT_TRIES:
            self._innocent += 1
            log.debug("%s: its channel was closed by another message (%s); sending it again", self.destination, text)
            return
        self.uncertain = False  # refused: not in the queue
        if size is not None:
            raise MessageTooLargeError(
                self.destination, len(self.message.body), int(size.group(2)), "the broker's max_message_size"
            ) from exc
        if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity):
            raise NotFoundError(self.destination, text) from exc
        if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
            raise PublishError(self.destination, f"the broker refused access (403): {text}") from exc
        raise PublishError(self.destination, f"the broker closed the channel: {text}") from exc

    def _why(self) -> str:
        blocked = self.transport.blocked
        if blocked is not None:
            return f"the broker blocked the connection ({blocked}; it takes it once the alarm clears)"
        return "the connection dropped, stalled or was too slow"

    def _gave_up(self, nacked: bool) -> PublishError:
        timeout = self.transport.publish_timeout
        if self.uncertain:
            return PublishUnconfirmedError(self.destination, self.message.message_id, self._why(), timeout)
        blocked = self.transport.blocked
        if blocked is not None:
            return BrokerBlockedError(self.destination, blocked, timeout)
        return BrokerUnavailableError(self.destination, self.transport.unavailable(nacked=nacked))


async def _settled(confirmation: asyncio.Future[_Confirmation]) -> _Confirmation:
    """The broker's confirm; ConnectionError when the connection's end cancelled the future (aiormq
    does, for a stalled connection) rather than this task being cancelled."""
    try:
        return await asyncio.shield(confirmation)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if confirmation.done() and (task is None or not task.cancelling()):
            raise ConnectionError("the connection closed before the broker confirmed the message") from None
        raise
