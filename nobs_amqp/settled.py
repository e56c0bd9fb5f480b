"""What a worker settled lately: a redelivered copy of a settled attempt (its ack was lost with
the connection) is acked without running it again."""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from .message import RESENT, Message, printable
from .signing import Signer

log = logging.getLogger("nobs_amqp")

#: (message id, attempt, first enqueue time): one attempt of one message.
Identity = tuple[str, int, str]
#: How many settled attempts a worker remembers.
REMEMBERED = 10_000


class SettledAttempts:
    """The last `size` attempts settled here, and those running here right now."""

    def __init__(self, size: int = REMEMBERED) -> None:
        self._size = size
        # Settled attempts as compact keys (one short string each, not a tuple of three objects:
        # a third of the memory), and the order to forget them in.
        self._settled: set[str] = set()
        self._order: deque[str] = deque()
        # Running here, each with the event a redelivered copy waits on (made when one does).
        self._running: dict[Identity, asyncio.Event | None] = {}

    async def seen(self, identity: Identity) -> bool:
        """Whether this attempt was settled here before, waiting for it if it is running here
        right now (the broker redelivered it after a connection loss)."""
        if identity in self._running:
            done = self._running[identity]
            if done is None:
                done = self._running[identity] = asyncio.Event()
            await done.wait()
        return _key(identity) in self._settled

    async def copy_of_settled(
        self, identity: Identity, message: Message, *, redelivered: bool, signer: Signer | None, queue: str
    ) -> bool:
        """Whether `message` (attempt `identity`, consumed from `queue`) is a copy of an attempt
        settled here. Without signing, only the broker's word (a redelivery) or the producer's (a
        copy it sent again, its first send unconfirmed) makes it one: a publisher that reuses
        message ids gets each message run. With signing, only a copy that verifies can be one (a
        forged copy never makes the real message be skipped), and any such copy is: a signed
        message published again unchanged is a replay."""
        again = redelivered or message.headers.get(RESENT) is True
        if signer is None:
            return again and await self.seen(identity)
        if not self.known(identity) or signer.problem(message, queue) is not None:
            return False
        if not await self.seen(identity):
            return False
        if not again:
            log.warning(
                "task %s id %s attempt %d: a signed copy of an attempt settled here came again, neither "
                "redelivered nor sent again by its producer (published again by someone?); acked without running it",
                printable(message.task),
                printable(message.message_id),
                identity[1],
            )
        return True

    def known(self, identity: Identity) -> bool:
        """Whether `identity` was settled here, or runs here now (a cheap test before `seen`)."""
        return identity in self._running or _key(identity) in self._settled

    def start(self, identity: Identity | None) -> bool:
        """`identity` runs from now until `end(identity)`: a copy of it that arrives meanwhile
        waits for the end. False (and nothing to end) if it is running here already."""
        if identity is None or identity in self._running:
            return False
        self._running[identity] = None
        return True

    def end(self, identity: Identity | None) -> None:
        done = self._running.pop(identity, None) if identity is not None else None
        if done is not None:
            done.set()

    def remember(self, identity: Identity | None) -> None:
        if identity is None:
            return
        key = _key(identity)
        if key in self._settled:
            return
        self._settled.add(key)
        self._order.append(key)
        if len(self._order) > self._size:
            self._settled.discard(self._order.popleft())


def _key(identity: Identity) -> str:
    """`identity` as one string, and no other identity as the same one (the id's length first)."""
    message_id, attempt, enqueued = identity
    return f"{len(message_id)}:{message_id}{attempt}:{enqueued}"
