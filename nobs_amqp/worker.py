"""A Worker: a named queue, its retry policy, and the way to put tasks on it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Protocol, TypeVar

from . import message as wire
from .errors import ConfigurationError, NotInProjectError
from .ladder import checked_seconds, ladder_delay
from .ratelimit import RateLimitOption
from .ratelimit import rate_limit as rate_limit_of
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


class Worker:
    """Processes tasks put on the queue of the same name.

    Options are keyword-only: `stop`, `wait`, `retry` are tenacity strategies
    (default: 5 attempts in all, exponential jittered waits from 1 s);
    `concurrency` is how many tasks run at once; `prefetch` how many unacked
    messages a process holds (default: the concurrency); `time_limit` per
    task; `queue_type` "quorum" (default) or "classic"; `max_priority`: messages
    may carry a priority 0..N (a classic queue has N levels; a quorum one, on RabbitMQ
    4.x only, two: 0-4 normal, 5 and up high); `rate_limit`: at most so many task
    starts per period across all of the worker's processes ("10/s", "100/m", "5/h", or a
    shared `RateLimit`; a task waiting for its turn holds a concurrency slot);
    `delivery_limit`: a message handed out this many times without being settled (its
    worker died or stopped each time) goes to the DLQ instead of running again;
    `lifespan`: an async context manager factory run once in each consuming process
    around all of its tasks, whose yielded value tasks read as `current_task().state`
    (a database pool, an HTTP client).
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
        rate_limit: RateLimitOption = None,
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
        if max_priority is not None and not 1 <= max_priority <= 255:
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
        #: At most so many task starts per period across all of this worker's processes (None: no limit).
        self.rate_limit = rate_limit_of(rate_limit, name, f"worker {name!r}")
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
        self, fn: Callable[[P], object], payload: P, *, delay: Delay | None = None, priority: int | None = None
    ) -> str:
        """Put `fn(payload)` on this worker's queue; return its message id once the broker confirmed it.

        `delay` (seconds or timedelta) holds it back that long, rounded up to whole
        seconds. It never waits for the task itself.
        """
        task, body, wait = self._checked(fn, payload, delay, priority)
        session = self.project.session
        message = self._message(session, task, body, wait, priority)
        await session.send(self, message, wait)
        return message.message_id

    async def queue_many(
        self,
        fn: Callable[[P], object],
        payloads: Iterable[P],
        *,
        delay: Delay | None = None,
        priority: int | None = None,
    ) -> list[str]:
        """Queue `fn` once per payload, confirms pipelined; every payload is checked before any is sent."""
        checked = [self._checked(fn, payload, delay, priority) for payload in payloads]
        session = self.project.session
        messages = [(self._message(session, task, body, wait, priority), wait) for task, body, wait in checked]
        for message, _ in messages:  # none is sent if one is too large
            session.transport.check_size(self.name, message)
        await asyncio.gather(*(session.send(self, message, wait) for message, wait in messages))
        return [message.message_id for message, _ in messages]

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
                    f"worker {self.name!r} has no priorities: create it with Worker({self.name!r}, "
                    f"max_priority=N) (on a quorum queue, RabbitMQ 4.x; on 3.x add queue_type='classic')"
                )
            if not 0 <= priority <= limit:
                raise ConfigurationError(f"priority must be 0..{limit} for worker {self.name!r} (got {priority})")
        return spec.reference, spec.encode(payload), wait

    def _message(self, session: Session, task: str, body: bytes, wait: int, priority: int | None) -> wire.Message:
        return wire.new_message(body, task, self.project.name, now=session.now(), delay=wait, priority=priority)
