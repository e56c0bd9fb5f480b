"""Leases on RabbitMQ: exclusive queues, which one connection at a time may declare.

The broker deletes an exclusive queue as soon as the connection that declared it closes or is
lost (a killed process's socket closes at once; a silent network loss ends with the heartbeat),
so whoever declares it next holds the lease. Nothing is stored in it. The AMQP transport keeps
one `ExclusiveQueues` (one channel) for all its leases.
"""

from __future__ import annotations

import aiormq

from ..base import LeaseState


class ExclusiveQueues:
    """The leases one AMQP connection holds, each an exclusive queue of the lease's name."""

    def __init__(self) -> None:
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._held: dict[str, aiormq.abc.AbstractConnection] = {}  # lease -> the connection it was taken on

    async def _channel_on(self, connection: aiormq.abc.AbstractConnection) -> aiormq.abc.AbstractChannel:
        """A channel of `connection`: an answer such as RESOURCE_LOCKED closes it, so reopened as needed."""
        channel = self._channel
        if channel is None or channel.is_closed or channel.connection is not connection:
            channel = self._channel = await connection.channel(publisher_confirms=False)
        return channel

    async def lease(self, connection: aiormq.abc.AbstractConnection, name: str) -> LeaseState:
        """Keep `name` if `connection` holds it (the queue is still there), else try to take it.
        After a reconnection the old connection's queue is gone: it is taken again, or busy."""
        if self._held.get(name) is connection:
            try:
                await (await self._channel_on(connection)).queue_declare(name, passive=True)
                return "held"
            except aiormq.exceptions.ChannelLockedResource:  # deleted, then taken by another connection
                del self._held[name]
                return "busy"
            except aiormq.exceptions.ChannelNotFoundEntity:  # deleted by someone: take it again
                pass
        self._held.pop(name, None)
        try:
            channel = await self._channel_on(connection)
            await channel.queue_declare(name, exclusive=True, durable=False, auto_delete=False)
        except aiormq.exceptions.ChannelLockedResource:
            return "busy"
        self._held[name] = connection
        return "taken"

    async def release(self, connection: aiormq.abc.AbstractConnection, name: str) -> None:
        """Delete the queue of `name` if `connection` holds it, so another can take it at once."""
        if self._held.pop(name, None) is connection and not connection.is_closed:
            await (await self._channel_on(connection)).queue_delete(name)
