"""Deliveries from RabbitMQ, taken from aiormq as they arrive.

aio-pika's consumers wrap each delivery in an `IncomingMessage` (two dozen attribute writes) and
run the callback in a task of their own, on top of the task aiormq already runs it in. A
`DirectQueue` is aio-pika's robust queue (declared and consumed again after a reconnection)
whose consumer gets aiormq's `DeliveredMessage`; `AmqpDelivery` reads the properties from it once.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any

import aio_pika
from aiormq.abc import DeliveredMessage

from ...message import Message, wall_clock
from .acks import Acker


class DirectQueue(aio_pika.RobustQueue):
    """aio-pika's robust queue (declared and consumed again after a reconnection), whose consumers
    take aiormq's deliveries as they are: no aio-pika `IncomingMessage` and no task of aio-pika's
    per message on top of aiormq's."""

    async def consume(  # type: ignore[override]
        self,
        callback: Callable[[DeliveredMessage], Coroutine[Any, Any, None]],
        no_ack: bool = False,
        exclusive: bool = False,
        arguments: dict[str, Any] | None = None,
        consumer_tag: aio_pika.abc.ConsumerTag | None = None,
        timeout: aio_pika.abc.TimeoutType = None,  # noqa: ASYNC109 - aio-pika's signature
        robust: bool = True,
    ) -> aio_pika.abc.ConsumerTag:
        channel = await self.channel.get_underlay_channel()
        result = await channel.basic_consume(
            queue=self.name,
            consumer_callback=callback,
            exclusive=exclusive,
            no_ack=no_ack,
            arguments=arguments,
            consumer_tag=consumer_tag,
            timeout=timeout,
        )
        if result.consumer_tag is None:
            raise RuntimeError("the broker gave the consumer no tag")
        if robust:  # what RobustQueue.restore() consumes again with, on the new channel
            self._consumers[result.consumer_tag] = {
                "callback": callback,
                "no_ack": no_ack,
                "exclusive": exclusive,
                "arguments": arguments,
            }
        return result.consumer_tag


class AmqpDelivery:
    __slots__ = ("_acker", "_tag", "message", "queue", "redelivered")

    def __init__(self, delivered: DeliveredMessage, queue: str, tag: int, acker: Acker) -> None:
        self._acker = acker
        self._tag = tag
        self.queue = queue
        self.redelivered = bool(delivered.delivery.redelivered)  # type: ignore[union-attr]  # a Basic.Deliver
        self.message = message_of(delivered)

    async def ack(self) -> None:
        self._acker.ack(self._tag)

    async def nack(self, *, requeue: bool) -> None:
        await self._acker.nack(self._tag, requeue=requeue)


def message_of(delivered: DeliveredMessage) -> Message:
    """The message of a delivery, its properties read once."""
    properties = delivered.header.properties
    timestamp = properties.timestamp
    headers = properties.headers
    return Message(
        delivered.body,
        properties.message_type or "",
        properties.message_id or "",
        properties.app_id or "",
        timestamp if isinstance(timestamp, datetime) else wall_clock(),
        _plain_headers(headers) if headers else {},
        properties.priority or None,
        properties.reply_to or None,
        properties.correlation_id or None,
    )


def _plain_headers(headers: dict[str, Any]) -> dict[str, object]:
    return {k: v.decode(errors="replace") if isinstance(v, bytes) else v for k, v in headers.items()}
