"""A session: one open connection of a project, and everything that lives as long as it.

`Project` is what a project *is* (its name, workers, what it allows to run, where its broker
is); opening it makes a `Session`, which owns the transport, the cache of what was declared on
this connection, and sending (signing, the ladder route, one deadline per publish). Closing
the project drops the session, and with it everything that was true only of that connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol

from . import delay as ladder
from .amqp import AmqpTransport
from .memory import MemoryTransport
from .message import Message
from .signing import Signer
from .tasks import TaskTable
from .topology import QueueOptions, Topology, dead_letter_exchange, worker_topology
from .transport import Transport, one_deadline
from .urls import in_process


class Destination(Protocol):
    """What sending needs of a worker: its queue's name and options."""

    @property
    def name(self) -> str: ...

    @property
    def queue_options(self) -> QueueOptions: ...


def connect(urls: Sequence[str], *, name: str, pool_size: int, publish_timeout: float) -> Transport:
    """The transport for `urls` (not opened yet): the in-process broker, or RabbitMQ."""
    if in_process(urls[0]):
        return MemoryTransport(urls[0])
    return AmqpTransport(urls, name=name, pool_size=pool_size, publish_timeout=publish_timeout)


class Session:
    """One open connection of project `project` (its name): send, declare, read the clock."""

    def __init__(
        self,
        project: str,
        transport: Transport,
        *,
        signer: Signer | None,
        publish_timeout: float,
        tasks: Callable[[], TaskTable],
    ) -> None:
        self.project = project
        self.transport = transport
        self.signer = signer
        self.publish_timeout = publish_timeout
        self._tasks = tasks
        self._declared: set[str] = set()
        # (worker, delayed) pairs whose whole route is declared: send()'s hot path checks only this.
        self._routes_ready: set[tuple[str, bool]] = set()
        self._declaring: dict[str, asyncio.Lock] = {}

    def __repr__(self) -> str:
        return f"Session({self.project!r})"

    def now(self) -> datetime:
        """The broker side's clock (virtual on memory://)."""
        return self.transport.now()

    def tasks(self) -> TaskTable:
        """Every task the project's workers run (imports the task modules the first time)."""
        return self._tasks()

    # -- sending -----------------------------------------------------------------------------

    async def send(self, worker: Destination, message: Message, delay: int) -> None:
        """Publish `message` to `worker`'s queue, through the delay ladder when `delay` (whole
        seconds, as `delay.delay_seconds` rounded it) is more than 0. An unreachable broker is
        waited for, declaring included, up to `publish_timeout` in all."""
        route = (worker.name, delay > 0)
        with one_deadline(self.publish_timeout):
            if route not in self._routes_ready:
                await self.declare(worker, delayed=delay > 0)
                self._routes_ready.add(route)
            if delay > 0:
                exchange, key = ladder.route(self.project, delay, worker.name)
                await self._publish(exchange, key, message)
            else:
                await self._publish("", worker.name, message)

    async def dead_letter(self, worker: Destination, message: Message) -> None:
        """Publish `message` (a dead-letter copy) to `worker`'s dead-letter exchange."""
        with one_deadline(self.publish_timeout):
            await self.declare(worker, delayed=False)
            await self._publish(dead_letter_exchange(worker.name), "", message)

    async def _publish(self, exchange: str, key: str, message: Message) -> None:
        if self.signer is not None:
            message = self.signer.sign(message)
        await self.transport.publish(exchange, key, message)

    # -- declaring ---------------------------------------------------------------------------

    def forget_declared(self, worker: Destination) -> None:
        """Declare `worker`'s topology and the ladder again on next use (after a 404 or a
        returned publish showed that something was deleted)."""
        for key in (f"worker:{worker.name}", "ladder", f"deliver:{worker.name}"):
            self._declared.discard(key)
        self._routes_ready.discard((worker.name, True))
        self._routes_ready.discard((worker.name, False))

    async def declare(self, worker: Destination, *, delayed: bool) -> None:
        """Declare `worker`'s topology (and the delay ladder) once per connection."""
        await self._declare_once(f"worker:{worker.name}", lambda: self.worker_topology(worker))
        if delayed:
            await self._declare_once("ladder", lambda: ladder.ladder_topology(self.project))
            await self._declare_once(
                f"deliver:{worker.name}", lambda: ladder.delivery_binding(self.project, worker.name)
            )

    def worker_topology(self, worker: Destination) -> Topology:
        return worker_topology(worker.name, worker.queue_options, self.transport.server_version)

    def topology(self, workers: Sequence[Destination]) -> Topology:
        """Everything a project with `workers` declares, for this connection's broker version."""
        total = ladder.ladder_topology(self.project)
        for worker in workers:
            total = total + self.worker_topology(worker) + ladder.delivery_binding(self.project, worker.name)
        return total

    async def _declare_once(self, key: str, build: Callable[[], Topology]) -> None:
        if key in self._declared:
            return
        lock = self._declaring.setdefault(key, asyncio.Lock())
        async with lock:
            if key in self._declared:
                return
            await self.transport.declare(build())
            self._declared.add(key)
