"""A Project: what one application is (its workers, what it allows to run, where its broker is).

Opening it makes a `Session` (one connection, its declare-once cache, sending); closing it
drops the session. The FastAPI glue is in `asgi.py`; the methods here are its public names.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .consumer import Consumer, consuming
from .errors import ConfigurationError, ProjectNotOpenError, TaskNotAllowedError, UnknownTaskError
from .observe.logs import TaskLog
from .observe.observer import Observer
from .observe.tracing import automatic as automatic_tracing
from .session import Lifespan, Session
from .signing import Signer, SigningKeys
from .tasks import Allowlist, TaskFunction, TaskSpec, TaskTable, task_spec
from .topology import Topology, check_name
from .transports import DEFAULT_HEARTBEAT, connect
from .urls import broker_urls as checked_urls
from .worker import Worker

if TYPE_CHECKING:
    from .schedule import Schedule
    from .sync import SyncProducer

log = logging.getLogger("nobs_amqp")

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
URL_ENV = "NOBS_AMQP_URL"


def project_urls(url: str | Sequence[str] | None) -> tuple[str, ...]:
    """The broker URL(s): the argument, else NOBS_AMQP_URL (comma-separated), else localhost;
    each checked (ConfigurationError, never showing a credential, for a malformed one)."""
    if url is not None:
        return checked_urls(url, "Project(url=...)")
    return checked_urls(os.environ.get(URL_ENV) or DEFAULT_URL, URL_ENV)


def _whole(value: object, name: str, *, minimum: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name} must be a whole number, {minimum} or more (got {value!r}; {hint})")
    return value


def _seconds(value: float, name: str) -> float:
    """`value`, a timeout in seconds, checked: more than 0."""
    if value <= 0:
        raise ConfigurationError(f"{name} must be more than 0 seconds (got {value})")
    return value


def _replicas(value: object) -> int:
    """`value`, the replicas of a quorum queue, checked: a whole number of nodes."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(
            f"replicas must be a whole number of nodes, 1 or more (got {value!r}); 3 or 5 on a cluster"
        )
    return value


def _size(value: object) -> int | None:
    """`value`, the largest message body in bytes, checked; None (the broker's default) stays None."""
    return None if value is None else _whole(value, "max_message_size", minimum=1, hint="bytes")


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
    broker before it raises `BrokerUnavailableError`. `worker_lifespan`: what the tasks of a
    consuming process share, opened once for all its workers that have no lifespan of their own
    (see `Worker(lifespan=...)`); not the FastAPI lifespan, which is `project.lifespan`.
    `schedules`: tasks enqueued periodically (`Schedule`), by whichever `nobs-amqp schedule`
    process is active. `observers`: metrics, logs and traces (`observe.Observer`); every project
    also logs each finished delivery (`logs.TaskLog`) and, when OpenTelemetry is installed, traces
    (`tracing.Tracing`) unless `tracing=False`. `broker_consumer_timeout`: RabbitMQ's
    `consumer_timeout` in seconds, when its rabbitmq.conf changed it (before 3.11.15 a worker cannot
    set its own; see `Worker(time_limit=...)`). `replicas`: on a cluster, how many nodes each quorum
    queue the project creates is replicated to (RabbitMQ's initial group size: at most the
    cluster's size; odd numbers, 3 or 5, tolerate the loss of 1 or 2 nodes). `heartbeat`: the
    AMQP heartbeat in seconds (a URL's `?heartbeat=N` wins): a connection that stalls (the peer
    stops answering and closes nothing) is dropped and reconnected within `heartbeat + 1` s, and
    the broker drops one whose event loop is blocked for about twice that. `max_message_size`:
    the largest body, in bytes, `queue()` sends (default: RabbitMQ's own default for its
    version, 128 MiB on 3.x and 16 MiB on 4.x); a larger one raises `MessageTooLargeError` at
    the call site. Set it to what the broker's `max_message_size` says when that differs.
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
        worker_lifespan: Lifespan | None = None,
        schedules: Iterable[Schedule] = (),
        observers: Iterable[Observer] = (),
        broker_consumer_timeout: float = 1800.0,
        tracing: bool = True,
        replicas: int = 3,
        heartbeat: int = DEFAULT_HEARTBEAT,
        max_message_size: int | None = None,
    ) -> None:
        self.name = check_name("project", name)
        self.workers: dict[str, Worker] = {}
        for worker in workers:
            self._add(worker)
        self._url = url
        if url is not None:
            project_urls(url)  # fail at construction for a bad explicit URL
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
        self._publish_timeout = _seconds(publish_timeout, "publish_timeout")
        self.broker_consumer_timeout = _seconds(broker_consumer_timeout, "broker_consumer_timeout")
        self.replicas = _replicas(replicas)
        self.heartbeat = _whole(heartbeat, "heartbeat", minimum=0, hint="seconds; 0 turns heartbeats off")
        self.max_message_size = _size(max_message_size)
        self._session: Session | None = None
        self._sync: SyncProducer | None = None
        self.worker_lifespan = worker_lifespan
        #: Metrics, logs and traces (`observe.Observer`), told what every session of the project does.
        self.observers: list[Observer] = list(observers)
        #: Trace with OpenTelemetry when it can be imported (False: never import it).
        self.tracing = tracing
        self._specs: dict[TaskFunction, TaskSpec] = {}
        self.schedules: dict[str, Schedule] = {}
        for schedule in schedules:  # last: checking one asks the project about its worker and task
            self._add_schedule(schedule)

    def __repr__(self) -> str:
        return f"Project({self.name!r}, workers={list(self.workers)})"

    def _add(self, worker: Worker) -> None:
        if worker._project is not None and worker._project is not self:
            raise ConfigurationError(f"worker {worker.name!r} is already in project {worker._project.name!r}")
        if worker.name in self.workers:
            raise ConfigurationError(f"project {self.name!r} has two workers named {worker.name!r}")
        worker._project = self
        self.workers[worker.name] = worker

    def _add_schedule(self, schedule: Schedule) -> None:
        schedule.check(self)  # its worker is here, and takes fn(payload) as queue() would
        if schedule.name in self.schedules:
            raise ConfigurationError(
                f"project {self.name!r} has two schedules named {schedule.name!r}: give one a name=..."
            )
        self.schedules[schedule.name] = schedule

    def worker(self, name: str) -> Worker:
        try:
            return self.workers[name]
        except KeyError:
            known = ", ".join(sorted(self.workers)) or "none"
            raise ConfigurationError(f"project {self.name!r} has no worker {name!r} (workers: {known})") from None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def session(self) -> Session:
        """The open connection's session (ProjectNotOpenError before `open()` / after `close()`)."""
        if self._session is None:
            raise ProjectNotOpenError(self.name)
        return self._session

    @property
    def urls(self) -> tuple[str, ...]:
        """Where the broker is: Project(url=...), else NOBS_AMQP_URL as it is when the project opens."""
        return project_urls(self._url)

    @property
    def publish_timeout(self) -> float:
        """Seconds `queue()` waits for an unreachable broker before it raises `BrokerUnavailableError`."""
        return self._publish_timeout

    @property
    def is_open(self) -> bool:
        return self._session is not None

    async def open(self) -> None:
        """Connect and make the session. The configuration is checked before connecting (a bad
        URL or NOBS_AMQP_SIGNING_KEY raises with nothing opened); whatever fails once the
        connection is open closes it before raising."""
        if self._session is not None:
            return
        session = await self.connected()
        self.signer = session.signer
        self._session = session

    async def connected(self) -> Session:
        """A new session on its own connection (the project's own is `open()`'s; the sync producer
        makes one on its I/O thread): checked, connected, and closed again if anything fails."""
        signer = self.signer if self._signing_key is not None else Signer.configured(None)  # the env, now
        transport = connect(
            self.urls,
            name=f"nobs-amqp {self.name}",
            pool_size=self._channel_pool_size,
            publish_timeout=self._publish_timeout,
            consumer_timeout=self.broker_consumer_timeout,
            replicas=self.replicas,
            heartbeat=self.heartbeat,
            max_message_size=self.max_message_size,
        )
        try:
            await transport.open()
            return Session(
                self.name,
                transport,
                signer=signer,
                publish_timeout=self._publish_timeout,
                tasks=self.tasks,
                lifespan=self.worker_lifespan,
                # Outermost first: the task line is logged inside the delivery's span.
                observers=[*automatic_tracing(self.observers, self.tracing), *self.observers, TaskLog()],
            )
        except BaseException:  # a connection half opened, or opened for a session that failed: closed
            with contextlib.suppress(Exception):  # the error that stopped open() is the one to raise
                await transport.close()
            raise

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.transport.close()

    async def __aenter__(self) -> Project:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def sync(self) -> SyncProducer:
        """The project's producer for sync code (Django, Flask, scripts), on its own connection
        and I/O thread, opened on first use: `project.sync().queue(worker, fn, payload)`. The same
        one each time, until it is closed; then a new one."""
        from .sync import made  # the I/O thread's machinery, when sync code queues

        return made(self)

    def lifespan(self, app: object = None) -> AbstractAsyncContextManager[None]:
        """For `FastAPI(lifespan=project.lifespan)`: open on startup, close on shutdown."""
        from . import asgi  # the FastAPI glue, when it is used

        return asgi.lifespan(self)

    def lifespan_consuming(
        self, *workers: Worker | str, **options: Any
    ) -> Callable[[object], AbstractAsyncContextManager[None]]:
        """A lifespan that also consumes `workers` in this process:
        `FastAPI(lifespan=project.lifespan_consuming(priority_queue))`."""
        from . import asgi  # the FastAPI glue, when it is used

        return asgi.lifespan_consuming(self, self._chosen(workers), **options)

    def consuming(self, *workers: Worker | str, **options: Any) -> AbstractAsyncContextManager[list[Consumer]]:
        """Consume `workers` (default: all) in the background of an open project until the block
        ends; then stop taking messages and let running tasks finish (`grace_period`)."""
        return consuming(self.session, self._chosen(workers), **options)

    def _chosen(self, workers: Iterable[Worker | str]) -> list[Worker]:
        return [self.worker(w) if isinstance(w, str) else w for w in workers] or list(self.workers.values())

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

    def topology(self) -> Topology:
        """Everything this project declares (needs an open project for the server version)."""
        return self.session.topology(list(self.workers.values()))
