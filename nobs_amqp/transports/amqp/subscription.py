"""A consumer's subscription on RabbitMQ: its channel, its batched acks, and giving back what it
held when it closes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel

from ...urls import describe_error as _describe
from .acks import Acker
from .sending import CONNECTION_ERRORS, REFUSALS

log = logging.getLogger("nobs_amqp")

#: How long closing a subscription waits for the broker to show the messages it gave back.
RETURN_WAIT_SECONDS = 2.0
#: How long a round trip of a shutdown (cancel a consumer, close a channel or a connection) waits
#: for the broker: past it, a stalled broker is left to notice the connection is gone.
SHUTDOWN_ROUND_TRIP_SECONDS = 5.0


class AmqpSubscription:
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
        """Stop deliveries; a broker that does not answer within SHUTDOWN_ROUND_TRIP_SECONDS (a
        stalled connection) is not waited for."""
        if not self._channel.is_closed:
            try:
                async with asyncio.timeout(SHUTDOWN_ROUND_TRIP_SECONDS):
                    await self._queue.cancel(self.tag)
            except (*CONNECTION_ERRORS, TimeoutError) as exc:
                log.debug("cancel of consumer %s failed: %s", self.tag, _describe(exc))

    async def flush(self) -> None:
        if self._acker is not None:
            await self._acker.flush()

    async def close(self) -> None:
        """Send pending acks, then close the channel: the broker returns every message still
        unsettled. It puts them back asynchronously: wait (up to RETURN_WAIT_SECONDS) until the
        queue shows them, so a count or a read right after this sees the queue as it was. A
        broker that does not answer (a stalled connection) is not waited for."""
        try:
            async with asyncio.timeout(SHUTDOWN_ROUND_TRIP_SECONDS):
                await self.flush()
                if self._channel.is_closed:
                    return
                held = self._acker.held if self._acker is not None else 0
                before = await self._count() if held else 0
                await self._channel.close()
        except TimeoutError:
            log.warning(
                "the broker did not answer the close of %s's consumer within %.0f s; it returns the "
                "messages it handed out once it notices the connection is gone",
                self._queue.name,
                SHUTDOWN_ROUND_TRIP_SECONDS,
            )
            return
        if held:
            await self._returned(before + held)

    async def _returned(self, expected: int) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + RETURN_WAIT_SECONDS
        try:
            async with asyncio.timeout_at(until + SHUTDOWN_ROUND_TRIP_SECONDS):
                while await self._count() < expected and loop.time() < until:  # noqa: ASYNC110 - the broker sends no event when a return lands
                    await asyncio.sleep(0.01)
        except (*CONNECTION_ERRORS, *REFUSALS) as exc:  # gone or deleted meanwhile: nothing to wait for
            log.debug("cannot count %s after giving messages back: %s", self._queue.name, _describe(exc))
