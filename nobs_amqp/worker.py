"""A Worker: a named queue, its retry policy, and the way to put tasks on it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any, Protocol, TypeVar

from . import chains
from . import message as wire
from .errors import ConfigurationError, NotInProjectError
from .handle import Queued
from .ladder import checked_seconds, ladder_delay
from .retry import RetryPolicy, RetryStrategy, StopStrategy, WaitStrategy
from .session import Lifespan, Session
from .tasks import TaskFunction, TaskSpec
from .topology import QueueOptions, QueueType, check_name

Delay = float | timedelta
#: A task's payload type: `queue(fn, payload)` takes a payload of the type `fn` takes.
P = TypeVar("P")


class Home(Protocol):
    """What a worker needs of the project it is in (a `Project`)."""

    @property
    def name(self) -> str: ...

    @property
    def session(self) -> Session: ...

    def spec(self, fn: TaskFunction) -> TaskSpec: ...

    def worker(self, name: str) -> Worker: ...


class Worker:
    """Processes tasks put on the queue of the same name.

    Options are keyword-only: `stop`, `wait`, `retry` are tenacity strategies
    (default: 5 attempts in all, exponential jittered waits from 1 s);
    `concurrency` is how many tasks run at once; `prefetch` how many unacked
    messages a process holds (default: the concurrency); `time_limit` per
    task; `queue_type` "quorum" (default) or "classic" (needed for
    `max_priority` on RabbitMQ 3.x); `delivery_limit`: a message handed out this
    many times without being settled (its worker died or stopped each time) goes
    to the DLQ instead of running again; `lifespan`: an async context manager factory run once
    in each consuming process around all of its tasks, whose yielded value tasks read as
    `current_task().state` (a database pool, an HTTP client).
    """

    def __init__(
        self,
        name: str,
        *,
        stop: StopStrategy | None = None,
        wait: WaitStrategy | None = None,
        retry: RetryStrategy | None = None,
        concurrency: int = 10,
        prefetch: int | None = None,
        time_limit: Delay | None = None,
        queue_type: QueueType = "quorum",
        max_priority: int | None = None,
        delivery_limit: int | None = 10,
        lifespan: Lifespan | None = None,
    ) -> None:
        self.name = check_name("worker", name)
        defaults = RetryPolicy()
        self.policy = RetryPolicy(stop or defaults.stop, wait or defaults.wait, retry or defaults.retry)
        if concurrency < 1:
            raise ConfigurationError(f"worker {name!r}: concurrency must be at least 1 (got {concurrency})")
        if prefetch is not None and prefetch < 1:
            raise ConfigurationError(f"worker {name!r}: prefetch must be at least 1 (got {prefetch})")
        if queue_type not in ("quorum", "classic"):
            raise ConfigurationError(f"worker {name!r}: queue_type must be 'quorum' or 'classic' (got {queue_type!r})")
        if max_priority is not None:
            if queue_type != "classic":
                raise ConfigurationError(
                    f"worker {name!r}: max_priority needs queue_type='classic' (quorum queues on "
                    f"RabbitMQ 3.x have no priorities)"
                )
            if not 1 <= max_priority <= 255:
                raise ConfigurationError(f"worker {name!r}: max_priority must be 1..255 (got {max_priority})")
        if delivery_limit is not None and delivery_limit < 1:
            raise ConfigurationError(f"worker {name!r}: delivery_limit must be at least 1 or None")
        self.concurrency = concurrency
        self.prefetch = prefetch
        self.time_limit = (
            checked_seconds(time_limit, f"worker {name!r}: time_limit", positive=True)
            if time_limit is not None
            else None
        )
        self.queue_options = QueueOptions(queue_type, delivery_limit, max_priority)
        #: Opens what this worker's tasks share, once per consuming process (`current_task().state`).
        self.lifespan = lifespan
        self._project: Home | None = None

    def __repr__(self) -> str:
        return f"Worker({self.name!r})"

    @property
    def project(self) -> Home:
        if self._project is None:
            raise NotInProjectError(self.name)
        return self._project

    async def queue(
        self,
        fn: Callable[[P], object],
        payload: P,
        *,
        delay: Delay | None = None,
        priority: int | None = None,
        result: bool = False,
        then: Sequence[chains.Step[Any]] = (),
    ) -> Queued:
        """Put `fn(payload)` on this worker's queue; return its handle (a `str`: its message id)
        once the broker confirmed it.

        `delay` (seconds or timedelta) holds it back that long, rounded up to whole
        seconds. It never waits for the task itself. `result=True`: its result can be awaited,
        `await handle.result(timeout=...)`. `then`: steps run one after the other once it
        succeeded (a chain; its result is the last step's).
        """
        task, body, wait = self._checked(fn, payload, delay, priority)
        session = self.project.session
        message = self._message(session, task, body, wait, priority)
        decode = self.project.spec(fn).decode_result() if result else None
        if then:
            chain, decode = chains.build(self.project, then)
            message = replace(message, headers={**message.headers, wire.CHAIN: chain.header()})
        if not result:
            await session.send(self, message, wait)
            return Queued(message.message_id, self.name)
        return await self._requested(session, message, wait, decode)

    async def queue_many(
        self,
        fn: Callable[[P], object],
        payloads: Iterable[P],
        *,
        delay: Delay | None = None,
        priority: int | None = None,
        result: bool = False,
    ) -> list[Queued]:
        """Queue `fn` once per payload, confirms pipelined; every payload is checked before any is
        sent. `result=True`: each result can be awaited (`gather_results(handles)` for all)."""
        checked = [self._checked(fn, payload, delay, priority) for payload in payloads]
        session = self.project.session
        messages = [(self._message(session, task, body, wait, priority), wait) for task, body, wait in checked]
        for message, _ in messages:  # none is sent if one is too large
            session.transport.check_size(self.name, message)
        if not result:
            await asyncio.gather(*(session.send(self, message, wait) for message, wait in messages))
            return [Queued(message.message_id, self.name) for message, _ in messages]
        decode = self.project.spec(fn).decode_result()
        return list(await asyncio.gather(*(self._requested(session, m, wait, decode) for m, wait in messages)))

    async def _requested(
        self, session: Session, message: wire.Message, wait: int, decode: Callable[[bytes], Any] | None
    ) -> Queued:
        """Send `message` asking for its result; its handle."""
        message = replace(message, headers={**message.headers, wire.REPLY: message.message_id})
        waiting = session.results.expect(message.message_id)
        try:
            await session.send(self, message, wait, reply=True)
        except BaseException:
            session.results.forget(message.message_id)
            raise
        return Queued(message.message_id, self.name, results=session.results, waiting=waiting, decode=decode)

    def _checked(
        self, fn: TaskFunction, payload: object, delay: Delay | None, priority: int | None
    ) -> tuple[str, bytes, int]:
        """The task reference, the body of `fn(payload)`, and the delay in the ladder's whole
        seconds (rounded once, here: the same value sets the ETA header and routes the message
        through the ladder). Raises at the call site for anything a worker would refuse."""
        spec = self.project.spec(fn)
        wait = ladder_delay(delay) if delay is not None else 0
        if priority is not None:
            limit = self.queue_options.max_priority
            if limit is None:
                raise ConfigurationError(
                    f"worker {self.name!r} has no priorities: create it with "
                    f"Worker({self.name!r}, queue_type='classic', max_priority=N)"
                )
            if not 0 <= priority <= limit:
                raise ConfigurationError(f"priority must be 0..{limit} for worker {self.name!r} (got {priority})")
        return spec.reference, spec.encode(payload), wait

    def _message(self, session: Session, task: str, body: bytes, wait: int, priority: int | None) -> wire.Message:
        return wire.new_message(body, task, self.project.name, now=session.now(), delay=wait, priority=priority)
