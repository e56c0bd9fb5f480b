"""A session: one open connection of a project, and everything that lives as long as it.

`Project` is what a project *is* (its name, workers, what it allows to run, where its broker
is); opening it makes a `Session`, which owns the transport, the cache of what was declared on
this connection, and sending (signing, the ladder route, one deadline per publish). Closing
the project drops the session, and with it everything that was true only of that connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from datetime import datetime
from typing import Any, Protocol

import orjson

from . import ladder
from .errors import LifespanError
from .message import DIRECT_REPLY_TO, Message, format_time
from .observe.observer import Observer, Observers, Publish, PublishKind
from .ratelimit import Permits
from .results import Results
from .signing import Signer
from .tasks import TaskTable
from .topology import (
    QueueOptions,
    Topology,
    cancellations,
    dead_letter_exchange,
    dead_letter_queue,
    unique_claim,
    worker_topology,
)
from .transports.base import ConnectionEvents, Transport, one_deadline
from .urls import node_address

log = logging.getLogger("nobs_amqp")

#: Opens what a worker process's tasks share (a database pool, an HTTP client) and yields it:
#: `@asynccontextmanager async def resources(): async with httpx.AsyncClient() as c: yield {"http": c}`.
Lifespan = Callable[[], AbstractAsyncContextManager[Any]]


class Destination(Protocol):
    """What sending needs of a worker: its queue's name and options."""

    @property
    def name(self) -> str: ...

    @property
    def queue_options(self) -> QueueOptions: ...


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
        lifespan: Lifespan | None = None,
        observers: Sequence[Observer] = (),
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
        self._lifespan = lifespan
        self._shared = _Shared()
        #: Rate limit permits, taken for this session's consumers.
        self.permits = Permits(project, transport, publish_timeout)
        #: The results this connection's callers await (replies come to this connection only).
        self.results = Results(signer)
        #: Metrics, logs and traces: told what happens on this connection.
        self.observers = Observers(observers)
        if isinstance(transport, ConnectionEvents):
            transport.on_connection.append(self._connection)
            transport.on_blocked.append(self.observers.connection_blocked)
        self.observers.broker_node(self.node)

    @property
    def node(self) -> str:
        """`host:port` of the broker node the connection reached (of a cluster: the one now)."""
        return node_address(self.transport.url)

    def _connection(self, up: bool) -> None:
        self.observers.connection(up)
        if up:
            self.observers.broker_node(self.node)

    def __repr__(self) -> str:
        return f"Session({self.project!r})"

    def now(self) -> datetime:
        """The broker side's clock (virtual on memory://)."""
        return self.transport.now()

    def tasks(self) -> TaskTable:
        """Every task the project's workers run (imports the task modules the first time)."""
        return self._tasks()

    # -- what tasks share -------------------------------------------------------------------

    @asynccontextmanager
    async def resources(self, owner: str, lifespan: Lifespan | None) -> AsyncIterator[Any]:
        """Run `lifespan` (a worker's own) around the block, or else the project's, which the
        consumers of this session share: opened by the first, closed after the last. Yields
        what it yielded (None without one). LifespanError when it fails to start."""
        if lifespan is not None:
            async with _entered(owner, lifespan) as state:
                yield state
        elif self._lifespan is not None:
            async with self._shared.use(f"project {self.project}", self._lifespan) as state:
                yield state
        else:
            yield None

    # -- sending -----------------------------------------------------------------------------

    async def send(
        self,
        worker: Destination,
        message: Message,
        delay: int,
        kind: PublishKind = PublishKind.TASK,
        *,
        reply: bool = False,
    ) -> None:
        """Publish `message` to `worker`'s queue, through the delay ladder when `delay` (whole
        seconds, as `delay.delay_seconds` rounded it) is more than 0. An unreachable broker is
        waited for, declaring included, up to `publish_timeout` in all. `kind` is what it is,
        for observers (a task, or a worker's retry copy). `reply`: ask for a reply, which comes
        to `results` (the caller expects it there first)."""
        route = (worker.name, delay > 0)
        with one_deadline(self.publish_timeout):
            if route not in self._routes_ready:
                await self.declare(worker, delayed=delay > 0)
                self._routes_ready.add(route)
            exchange, key = ladder.route(self.project, delay, worker.name) if delay > 0 else ("", worker.name)
            await self._publish(Publish(kind, worker.name, exchange, key, worker.name, delay, message), reply)

    async def answer(self, address: str, reply: Message) -> None:
        """Send `reply` (a task's result) to the direct reply-to `address`, signed if signing;
        never raises, never waits for a confirm (`Transport.reply`)."""
        if self.signer is not None:
            reply = self.signer.sign(reply, DIRECT_REPLY_TO)
        await self.transport.reply(address, reply)

    async def dead_letter(self, worker: Destination, message: Message) -> None:
        """Publish `message` (a dead-letter copy) to `worker`'s dead-letter exchange."""
        with one_deadline(self.publish_timeout):
            await self.declare(worker, delayed=False)
            exchange, queue = dead_letter_exchange(worker.name), dead_letter_queue(worker.name)
            await self._publish(Publish(PublishKind.DEAD_LETTER, worker.name, exchange, "", queue, 0, message))

    async def cancel(self, worker: Destination, message: Message) -> None:
        """Append `message` (a cancellation) to `worker`'s stream of cancelled ids."""
        with one_deadline(self.publish_timeout):
            await self.declare(worker, delayed=False)
            stream = cancellations(worker.name)
            await self._publish(Publish(PublishKind.CANCEL, worker.name, "", stream, stream, 0, message))

    async def claim(self, worker: Destination, message: Message, window: int) -> bool:
        """Take the claim of `message`'s id on `worker` for `window` seconds (`queue(unique=...)`):
        False if a message with that id was queued there less than `window` seconds ago."""
        with one_deadline(self.publish_timeout):
            name = unique_claim(worker.name, message.message_id, window)
            body = orjson.dumps({"message_id": message.message_id, "task": message.task, "worker": worker.name})
            claimed = {"x-nobs-claimed-at": format_time(message.timestamp)}
            marker = Message(body, message.task, message.message_id, self.project, message.timestamp, claimed)
            return await self.transport.claim(name, window, marker)

    async def unclaim(self, worker: Destination, message: Message, window: int) -> None:
        await self.transport.unclaim(unique_claim(worker.name, message.message_id, window))

    async def _publish(self, publish: Publish, reply: bool = False) -> None:
        """Publish `publish.message`, signed for the queue it ends in (`publish.queue`)."""
        if not self.observers.wrap_publishes:
            message = publish.message
            if self.signer is not None:
                message = self.signer.sign(message, publish.queue)
            await self._out(publish, message, reply)
            return
        with self.observers.publishing(publish) as observed:
            if self.signer is not None:
                observed = self.signer.sign(observed, publish.queue)
            await self._out(publish, observed, reply)

    async def _out(self, publish: Publish, message: Message, reply: bool) -> None:
        if reply:
            await self.transport.request(publish.exchange, publish.routing_key, message, self.results)
        else:
            await self.transport.publish(publish.exchange, publish.routing_key, message)

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


@asynccontextmanager
async def _entered(owner: str, lifespan: Lifespan) -> AsyncIterator[Any]:
    """`lifespan()` entered, its start failure wrapped in LifespanError, its close failure logged
    (the tasks are done by then: nothing of theirs is lost)."""
    manager = lifespan()
    try:
        state = await manager.__aenter__()
    except Exception as exc:
        raise LifespanError(owner, exc) from exc
    try:
        yield state
    except BaseException as exc:
        if not await manager.__aexit__(type(exc), exc, exc.__traceback__):
            raise
    else:
        try:
            await manager.__aexit__(None, None, None)
        except Exception as exc:  # noqa: BLE001 - reported; the worker's own work is finished
            log.error("the lifespan of %s failed to close: %s: %s", owner, type(exc).__name__, exc)


class _Shared:
    """A lifespan shared by the consumers of one session: the first opens it, the last closes it."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._users = 0
        self._state: Any = None
        self._opened: AsyncExitStack | None = None

    @asynccontextmanager
    async def use(self, owner: str, lifespan: Lifespan) -> AsyncIterator[Any]:
        async with self._lock:
            if self._opened is None:
                opened = AsyncExitStack()
                self._state = await opened.enter_async_context(_entered(owner, lifespan))
                self._opened = opened
            self._users += 1
        try:
            yield self._state
        finally:
            async with self._lock:
                self._users -= 1
                if self._users == 0 and self._opened is not None:
                    opened, self._opened, self._state = self._opened, None, None
                    await opened.aclose()
