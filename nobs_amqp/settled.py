"""What a worker settled lately: a redelivered copy of a settled attempt (its ack was lost with
the connection) is acked without running it again."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

#: (message id, attempt, first enqueue time): one attempt of one message.
Identity = tuple[str, int, str]
#: How many settled attempts a worker remembers.
REMEMBERED = 10_000


class SettledAttempts:
    """The last `size` attempts settled here, and those running here right now."""

    def __init__(self, size: int = REMEMBERED) -> None:
        self._size = size
        self._settled: OrderedDict[Identity, None] = OrderedDict()
        self._running: dict[Identity, asyncio.Event] = {}

    async def seen(self, identity: Identity) -> bool:
        """Whether this attempt was settled here before, waiting for it if it is running here
        right now (the broker redelivered it after a connection loss)."""
        running = self._running.get(identity)
        if running is not None:
            await running.wait()
        return identity in self._settled

    @contextmanager
    def running(self, identity: Identity | None) -> Iterator[None]:
        """The block runs `identity`: a copy of it that arrives meanwhile waits for the end."""
        done = asyncio.Event()
        if identity is not None:
            self._running.setdefault(identity, done)
        try:
            yield
        finally:
            if identity is not None and self._running.get(identity) is done:
                del self._running[identity]
            done.set()

    def remember(self, identity: Identity | None) -> None:
        if identity is None:
            return
        self._settled[identity] = None
        if len(self._settled) > self._size:
            self._settled.popitem(last=False)
