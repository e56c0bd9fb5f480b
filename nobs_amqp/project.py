"""A Project: the workers of one application, its broker connection and what it allows to run."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import delay as ladder
from .amqp import AmqpTransport, one_deadline
from .errors import ConfigurationError, ProjectNotOpenError, TaskNotAllowedError
from .memory import MEMORY_SCHEME, MemoryTransport
from .message import Message
from .signing import Signer, SigningKeys
from .tasks import Allowlist, TaskFunction, TaskSpec, TaskTable, UnknownTaskError, task_spec
from .topology import Topology, check_name, dead_letter_exchange, worker_topology
from .transport import Transport
from .urls import broker_urls as checked_urls

if TYPE_CHECKING:
    from .consumer import Consumer
    from .worker import Worker

log = logging.getLogger("nobs_amqp")

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
URL_ENV = "NOBS_AMQP_URL"


def broker_urls(url: str | Sequence[str] | None) -> tuple[str, ...]:
    """The broker URL(s): the argument, else NOBS_AMQP_URL (comma-separated), else localhost;
    each checked (ConfigurationError, never showing a credential, for a malformed one)."""
    if url is not None:
        return checked_urls(url, "Project(url=...)")
    return checked_urls(os.environ.get(URL_ENV) or DEFAULT_URL, URL_ENV)


def _caller_package(depth: int = 2) -> str | None:
    """Top-level package of the module that called our caller (None for a script)."""
    frame_globals = sys._getframe(depth).f_globals
    name = frame_globals.get("__name__")
    spec = frame_globals.get("__spec__")
    if name == "__main__" and spec is not None:
        name = spec.name
    if not isinstance(name, str) or name == "__main__":
        return None
    return name.partition(".")[0]


class Project:
    """The workers of one application.

    `url` (or NOBS_AMQP_URL, comma-separated for a cluster) says where RabbitMQ is.
    Workers run only tasks: functions of one request model (a pydantic model or a
    dataclass) defined in `packages` (by default the top-level package of the module
    that creates the project), and the functions listed in `tasks` (any payload type).
    A worker imports the modules of `packages` when it starts (only `modules`, when
    given), never because of a message. `signing_key` (or NOBS_AMQP_SIGNING_KEY): sign
    every message, and run only messages signed with it (a list rotates keys: the first
    signs, all verify). `publish_timeout`: how long `queue()` waits for an unreachable
    broker before it raises `BrokerUnavailableError`.
    """

    def __init__(
        self,
        name: str,
        workers: Iterable[Worker] = (),
        *,
        url: str | Sequence[str] | None = None,
        packages: Iterable[str] | None = None,
        tasks: Iterable[TaskFunction] = (),
        modules: Iterable[str] | None = None,
        signing_key: SigningKeys | None = None,
        channel_pool_size: int = 4,
        publish_timeout: float = 30.0,
    ) -> None:
        self.name = check_name("project", name)
        self.workers: dict[str, Worker] = {}
        for worker in workers:
            self._add(worker)
        self._url = url
        if url is not None:
            broker_urls(url)  # fail at construction for a bad explicit URL
        if packages is None:
            caller = _caller_package()
            packages = [caller] if caller else []
        self._explicit = tuple(tasks)
        self.allowlist = Allowlist.build(packages, self._explicit)
        self._modules = tuple(modules) if modules is not None else None
        self._table: TaskTable | None = None
        self._signing_key = signing_key
        self.signer = Signer.configured(signing_key) if signing_key is not None else None
        self._channel_pool_size = channel_pool_size
        if publish_timeout <= 0:
            raise ConfigurationError(f"publish_timeout must be more than 0 seconds (got {publish_timeout})")
        self._publish_timeout = publish_timeout
        self._transport: Transport | None = None
        self._declared: set[str] = set()
        # (worker, delayed) pairs whose whole route is declared: send()'s hot path checks only this.
        self._routes_ready: set[tuple[str, bool]] = set()
        self._declaring: dict[str, asyncio.Lock] = {}
        self._specs: dict[TaskFunction, TaskSpec] = {}

    def __repr__(self) -> str:
        return f"Project({self.name!r}, workers={list(self.workers)})"

    def _add(self, worker: Worker) -> None:
        if worker._project is not None and worker._project is not self:
            raise ConfigurationError(f"worker {worker.name!r} is already in project {worker._project.name!r}")
        if worker.name in self.workers:
            raise ConfigurationError(f"project {self.name!r} has two workers named {worker.name!r}")
        worker._project = self
        self.workers[worker.name] = worker

    def worker(self, name: str) -> Worker:
        try:
            return self.workers[name]
        except KeyError:
            known = ", ".join(sorted(self.workers)) or "none"
            raise ConfigurationError(f"project {self.name!r} has no worker {name!r} (workers: {known})") from None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def transport(self) -> Transport:
        if self._transport is None:
            raise ProjectNotOpenError(self.name)
        return self._transport

    @property
    def urls(self) -> tuple[str, ...]:
        """Where the broker is: Project(url=...), else NOBS_AMQP_URL as it is when the project opens."""
        return broker_urls(self._url)

    @property
    def is_open(self) -> bool:
        return self._transport is not None

    async def open(self) -> None:
        if self._transport is not None:
            return
        urls = self.urls
        transport: Transport
        if urls[0].startswith(MEMORY_SCHEME):
            transport = MemoryTransport(urls[0])
        else:
            transport = AmqpTransport(
                urls,
                name=f"nobs-amqp {self.name}",
                pool_size=self._channel_pool_size,
                publish_timeout=self._publish_timeout,
            )
        await transport.open()
        if self._signing_key is None:
            self.signer = Signer.configured(None)  # NOBS_AMQP_SIGNING_KEY as it is when the project opens
        self._transport = transport
        self._declared.clear()
        self._routes_ready.clear()

    async def close(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            await transport.close()

    async def __aenter__(self) -> Project:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """For `FastAPI(lifespan=project.lifespan)`: open on startup, close on shutdown."""
        async with self:
            yield

    def lifespan_consuming(
        self, *workers: Worker | str, **options: Any
    ) -> Callable[[object], AbstractAsyncContextManager[None]]:
        """A lifespan that also consumes `workers` in this process:
        `FastAPI(lifespan=project.lifespan_consuming(priority_queue))`."""

        @asynccontextmanager
        async def lifespan(app: object = None) -> AsyncIterator[None]:
            async with self, self.consuming(*workers, **options):
                yield

        return lifespan

    @asynccontextmanager
    async def consuming(self, *workers: Worker | str, **options: Any) -> AsyncIterator[list[Consumer]]:
        """Consume `workers` (default: all) in the background of an open project until the block
        ends; then stop taking messages and let running tasks finish (`grace_period`)."""
        from .consumer import Consumer

        chosen = [self.worker(w) if isinstance(w, str) else w for w in workers] or list(self.workers.values())
        consumers = [Consumer(self, worker, **options) for worker in chosen]
        runs = [asyncio.create_task(c.run(), name=f"nobs-consume-{c.worker.name}") for c in consumers]
        try:
            for consumer, run in zip(consumers, runs, strict=True):
                ready = asyncio.create_task(consumer.ready.wait())
                await asyncio.wait({run, ready}, return_when=asyncio.FIRST_COMPLETED)
                ready.cancel()
                if run.done():
                    run.result()  # raise what stopped it from starting
            yield consumers
        finally:
            for consumer in consumers:
                consumer.stop()
            for result in await asyncio.gather(*runs, return_exceptions=True):
                if isinstance(result, Exception):
                    log.error("consumer stopped with an error: %s", result)

    # -- producing ---------------------------------------------------------------------------

    def spec(self, fn: TaskFunction) -> TaskSpec:
        """The checked task spec of `fn`: raises at the call site for anything a worker would refuse."""
        spec = self._specs.get(fn)
        if spec is None:
            try:
                spec = self._specs[fn] = task_spec(fn, self.allowlist)
            except UnknownTaskError as exc:
                raise TaskNotAllowedError(str(exc), self.name) from None
        return spec

    def tasks(self) -> TaskTable:
        """Every task this project's workers run (imports the task modules the first time)."""
        if self._table is None:
            self._table = TaskTable(self.allowlist, self._explicit, self._modules)
        return self._table

    async def send(self, worker: Worker, message: Message, delay: float) -> None:
        """Publish `message` to `worker`'s queue, through the delay ladder when `delay` > 0.

        An unreachable broker is waited for (declaring included) up to `publish_timeout` in all."""
        seconds = ladder.delay_seconds(delay)
        route = (worker.name, seconds > 0)
        with one_deadline(self._publish_timeout):
            if route not in self._routes_ready:
                await self.declare(worker, delayed=seconds > 0)
                self._routes_ready.add(route)
            if seconds:
                exchange, key = ladder.route(self.name, seconds, worker.name)
                await self._publish(exchange, key, message)
            else:
                await self._publish("", worker.name, message)

    async def dead_letter(self, worker: Worker, message: Message) -> None:
        """Publish `message` (a dead-letter copy) to `worker`'s dead-letter exchange."""
        with one_deadline(self._publish_timeout):
            await self.declare(worker, delayed=False)
            await self._publish(dead_letter_exchange(worker.name), "", message)

    async def _publish(self, exchange: str, key: str, message: Message) -> None:
        if self.signer is not None:
            message = self.signer.sign(message)
        await self.transport.publish(exchange, key, message)

    def forget_declared(self, worker: Worker) -> None:
        """Declare `worker`'s topology and the ladder again on next use (after a 404 or a
        returned publish showed that something was deleted)."""
        for key in (f"worker:{worker.name}", "ladder", f"deliver:{worker.name}"):
            self._declared.discard(key)
        self._routes_ready.discard((worker.name, True))
        self._routes_ready.discard((worker.name, False))

    async def declare(self, worker: Worker, *, delayed: bool) -> None:
        """Declare `worker`'s topology (and the delay ladder) once per connection."""
        await self._declare_once(f"worker:{worker.name}", lambda: self._worker_topology(worker))
        if delayed:
            await self._declare_once("ladder", self._ladder_topology)
            await self._declare_once(f"deliver:{worker.name}", lambda: ladder.delivery_binding(self.name, worker.name))

    def _worker_topology(self, worker: Worker) -> Topology:
        return worker_topology(worker.name, worker.queue_options, self.transport.server_version)

    def _ladder_topology(self) -> Topology:
        return ladder.ladder_topology(self.name)

    async def _declare_once(self, key: str, build: Callable[[], Topology]) -> None:
        if key in self._declared:
            return
        lock = self._declaring.setdefault(key, asyncio.Lock())
        async with lock:
            if key in self._declared:
                return
            await self.transport.declare(build())
            self._declared.add(key)

    def topology(self) -> Topology:
        """Everything this project declares (needs an open project for the server version)."""
        total = ladder.ladder_topology(self.name)
        for worker in self.workers.values():
            total = total + self._worker_topology(worker) + ladder.delivery_binding(self.name, worker.name)
        return total
