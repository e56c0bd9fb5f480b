"""A Worker: a named queue, its retry policy, and the way to put tasks on it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Protocol, TypeVar

from . import chains
from . import message as wire
from .cancellation import cancel_message
from .errors import ConfigurationError, NotInProjectError
from .handle import Queued
from .ladder import checked_seconds, delay_seconds, ladder_delay
from .ratelimit import RateLimitOption
from .ratelimit import rate_limit as rate_limit_of
from .results import Decode
from .retry import RetryPolicy, RetryStrategy, StopStrategy, WaitStrategy
from .session import Lifespan, Session
from .tasks import TaskFunction, TaskSpec
from .topology import QueueOptions, QueueType, check_name

log = logging.getLogger("nobs_amqp")

Delay = float | timedelta
#: A task's payload type: `queue(fn, payload)` takes a payload of the type `fn` takes.
P = TypeVar("P")
#: A message ready to send, checked at the call site: its task reference, body and delay (whole seconds).
Checked = tuple[str, bytes, int]


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
    task; `queue_type` "quorum" (default) or "classic"; `max_priority`: messages
    may carry a priority 0..N (a classic queue has N levels; a quorum one, on RabbitMQ
    4.x only, two: 0-4 normal, 5 and up high); `rate_limit`: at most so many task
    starts per period across all of the worker's processes ("10/s", "100/m", "5/h", or a
    shared `RateLimit`; a task waiting for its turn holds a concurrency slot);
    `delivery_limit`: a message handed out this many times without being settled (its
    worker died or stopped each time) goes to the DLQ instead of running again;
    `cancellable`: tasks can be cancelled by id (`cancel()`; its workers follow a stream
    `W.cancelled`); `lifespan`: an async context manager factory run once in each
    consuming process around all of its tasks, whose yielded value tasks read as
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
        rate_limit: RateLimitOption = None,
        cancellable: bool = False,
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
        self.queue_options = QueueOptions(queue_type, delivery_limit, max_priority, cancellable)
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
        self,
        fn: Callable[[P], object],
        payload: P,
        *,
        delay: Delay | None = None,
        priority: int | None = None,
        message_id: str | None = None,
        expires: Delay | None = None,
        unique: Delay | None = None,
        result: bool = False,
        then: Sequence[chains.Step[Any]] = (),
    ) -> Queued:
        """Put `fn(payload)` on this worker's queue; return its handle (a `str`: its message id)
        once the broker confirmed it.

        `delay` (seconds or timedelta) holds it back that long, rounded up to whole
        seconds. It never waits for the task itself. `message_id`: the caller's id for it
        (else a random one). `expires`: a worker that takes it later than that after now
        dead-letters it as `expired` instead of running it. `unique` (needs `message_id`): not
        sent if a message with the same id was queued to this worker within that window (the
        handle says `duplicate`; `was_queued(handle)` is False). `result=True`: its result can be
        awaited, `await handle.result(timeout=...)`. `then`: steps run one after the other once
        it succeeded (a chain; its result is the last step's).
        """
        checked = self._checked(fn, payload, delay, priority)  # first: a mistake beats a closed project
        extras = Extras.checked(checked[2], priority, message_id, expires, unique, result)
        decode = self.project.spec(fn).decode_result() if result else None
        chain = None
        if then:
            chain, last = chains.build(self.project, then)
            decode = last if result else None
        return await self._put(self.project.session, checked, extras, chain=chain, decode=decode)

    async def cancel(self, message_id: str) -> None:
        """Cancel the task queued with `message_id` (waiting in the queue, delayed, or a retry):
        a worker that takes it dead-letters it as `cancelled` instead of running it. Returns once
        the broker confirmed the cancellation; a task already running is not interrupted.
        Needs `Worker(..., cancellable=True)`."""
        if not self.queue_options.cancellable:
            raise ConfigurationError(
                f"worker {self.name!r} takes no cancellations: create it with Worker({self.name!r}, cancellable=True)"
            )
        session = self.project.session
        await session.cancel(self, cancel_message(check_message_id(message_id), self.project.name, session.now()))

    async def queue_many(
        self,
        fn: Callable[[P], object],
        payloads: Iterable[P],
        *,
        delay: Delay | None = None,
        priority: int | None = None,
        expires: Delay | None = None,
        result: bool = False,
    ) -> list[Queued]:
        """Queue `fn` once per payload, confirms pipelined; every payload is checked before any is
        sent. `result=True`: each result can be awaited (`gather_results(handles)` for all)."""
        checked = [self._checked(fn, payload, delay, priority) for payload in payloads]
        wait = checked[0][2] if checked else 0  # one delay for all
        extras = Extras.checked(wait, priority, None, expires, None)
        decode = self.project.spec(fn).decode_result() if result else None
        return await self._put_many(self.project.session, checked, extras, result=result, decode=decode)

    async def _put(
        self,
        session: Session,
        checked: Checked,
        extras: Extras,
        *,
        chain: chains.Chain | None = None,
        decode: Decode | None = None,
    ) -> Queued:
        """Send what `_checked` made through `session` (with its chain, asking for its result when
        `extras.result`); its handle once confirmed. With `extras.unique`: the id's claim first."""
        task, body, wait = checked
        message = self._message(session, task, body, wait, extras)
        if chain is not None:
            message = replace(message, headers={**message.headers, wire.CHAIN: chain.header()})
        window = extras.unique
        if window is not None:
            session.transport.check_size(self.name, message)  # before the claim: a refused message claims nothing
            if not await session.claim(self, message, window):
                log.info(
                    "worker %s: id %s was queued within %d s; not queued again", self.name, message.message_id, window
                )
                return Queued(message.message_id, self.name, duplicate=True)
        try:
            if extras.result:
                return await self._requested(session, message, wait, decode)
            await session.send(self, message, wait)
        except BaseException:
            if window is not None:
                await session.unclaim(self, message, window)  # not sent: the caller may queue it again
            raise
        return Queued(message.message_id, self.name)

    async def _put_many(
        self,
        session: Session,
        checked: list[Checked],
        extras: Extras,
        *,
        result: bool = False,
        decode: Decode | None = None,
    ) -> list[Queued]:
        """Send every message `_checked` made through `session`, none if one is too large."""
        messages = [(self._message(session, task, body, wait, extras), wait) for task, body, wait in checked]
        for message, _ in messages:  # none is sent if one is too large
            session.transport.check_size(self.name, message)
        if not result:
            await asyncio.gather(*(session.send(self, message, wait) for message, wait in messages))
            return [Queued(message.message_id, self.name) for message, _ in messages]
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

    def _checked(self, fn: TaskFunction, payload: object, delay: Delay | None, priority: int | None) -> Checked:
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

    def _message(self, session: Session, task: str, body: bytes, wait: int, extras: Extras) -> wire.Message:
        return wire.new_message(
            body,
            task,
            self.project.name,
            now=session.now(),
            delay=wait,
            priority=extras.priority,
            message_id=extras.message_id,
            expires=extras.expires,
        )


@dataclass(frozen=True, slots=True)
class Extras:
    """What a `queue()` asks for besides its payload and delay, checked at the call site."""

    priority: int | None = None
    message_id: str | None = None
    #: Seconds from now after which the task is not run.
    expires: float | None = None
    #: The unique window in whole seconds.
    unique: int | None = None
    #: Whether the caller awaits its result.
    result: bool = False

    @classmethod
    def checked(
        cls,
        wait: int,
        priority: int | None,
        message_id: str | None,
        expires: Delay | None,
        unique: Delay | None,
        result: bool = False,
    ) -> Extras:
        """The options of one `queue()` due `wait` whole seconds from now; ConfigurationError for a bad one."""
        own_id = check_message_id(message_id) if message_id is not None else None
        if result and own_id is not None and not wire.awaitable_id(own_id):
            raise ConfigurationError(
                f"message_id {own_id!r} cannot carry a result: with result=True use printable ASCII without spaces"
            )
        return cls(priority, own_id, _lifetime(expires, wait), _window(unique, own_id), result)


def was_queued(message_id: str) -> bool:
    """Whether the `queue()` that returned `message_id` queued the task (False: a duplicate within
    its `unique` window, not sent)."""
    return not getattr(message_id, "duplicate", False)


#: A caller's message id: what an AMQP `message-id` property carries and a log line shows safely.
MAX_MESSAGE_ID = 200


def check_message_id(value: object) -> str:
    """`value` if it can be a message id: a non-empty string of at most MAX_MESSAGE_ID printable
    characters; else ConfigurationError."""
    if not isinstance(value, str) or not value or len(value) > MAX_MESSAGE_ID or not value.isprintable():
        raise ConfigurationError(
            f"message_id must be a non-empty string of at most {MAX_MESSAGE_ID} printable characters "
            f"(got {type(value).__name__} {wire.printable(repr(value), 80)})"
        )
    if len(value.encode()) > 255:
        raise ConfigurationError(f"message_id must be at most 255 bytes in UTF-8 (got {len(value.encode())})")
    return value


def _lifetime(expires: Delay | None, wait: int) -> float | None:
    """Seconds from now after which the task is not run; after its delay, if any."""
    if expires is None:
        return None
    lifetime = checked_seconds(expires, "expires", positive=True)
    if lifetime <= wait:
        raise ConfigurationError(
            f"expires ({lifetime:g} s) must be longer than the delay ({wait} s): the task would expire before it is due"
        )
    return lifetime


def _window(unique: Delay | None, message_id: str | None) -> int | None:
    """The unique window in whole seconds (rounded up), or None."""
    if unique is None:
        return None
    if message_id is None:
        raise ConfigurationError(
            "unique= needs message_id=: the id is what is unique, e.g. message_id=f'welcome-{user.id}'"
        )
    return delay_seconds(checked_seconds(unique, "unique", positive=True))
