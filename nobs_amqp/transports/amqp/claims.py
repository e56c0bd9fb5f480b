"""Claims on RabbitMQ: a classic queue that holds at most one message and refuses a second.

`queue(..., unique=window)` takes the claim of its message id by publishing one persistent
marker into the claim's queue (`topology.unique_claim`, declared with `x-max-length` 1 and
`x-overflow` reject-publish): the broker confirms the first and nacks every other while the
marker lives (`x-message-ttl` = the window). Every producer process sharing the broker sees the
same answer; nothing besides the broker is needed. The queue removes itself a minute after the
window once nobody declares it (`x-expires`).
"""

from __future__ import annotations

from typing import Any, cast

import aiormq
from pamqp.commands import Basic

from ...message import Message
from ...topology import unique_claim_arguments
from .frames import pamqp_properties


class ClaimQueues:
    """The claims one AMQP connection takes, on one confirm channel of their own."""

    def __init__(self) -> None:
        self._channel: aiormq.abc.AbstractChannel | None = None

    async def _channel_on(self, connection: aiormq.abc.AbstractConnection) -> aiormq.abc.AbstractChannel:
        channel = self._channel
        if channel is None or channel.is_closed or channel.connection is not connection:
            channel = self._channel = await connection.channel(publisher_confirms=True)
        return channel

    async def claim(self, connection: aiormq.abc.AbstractConnection, name: str, window: int, marker: Message) -> bool:
        """Publish `marker` into claim queue `name` (declared for `window` seconds): True once the
        broker confirmed it (the claim is taken here), False when it nacked it (someone holds it)."""
        channel = await self._channel_on(connection)
        await channel.queue_declare(name, durable=True, arguments=cast(Any, unique_claim_arguments(window)))
        properties = pamqp_properties(marker)
        try:
            confirmation = await channel.basic_publish(marker.body, routing_key=name, properties=properties)
        except aiormq.exceptions.DeliveryError as refused:  # aiormq raises a nack
            if isinstance(refused.frame, Basic.Nack):
                return False
            raise
        return isinstance(confirmation, Basic.Ack)

    async def unclaim(self, connection: aiormq.abc.AbstractConnection, name: str) -> None:
        """Purge claim queue `name`: the claim can be taken again at once."""
        await (await self._channel_on(connection)).queue_purge(name)
