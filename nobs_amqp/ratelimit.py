"""Rate limits: at most N task starts per period, across every worker process sharing the broker.

RabbitMQ is the only shared store. A limit is a sliding window kept in one classic queue
(`topology.rate_limit_topology`): at most N markers, each living one period, and a queue that
refuses (basic.nack) a marker past N. Taking a permit is publishing a marker: an ack is a
permit; a nack means N starts happened in the last period, so the task waits and tries again.
Markers expire on the broker, which frees their slots: no window of one period holds more
than N starts, whatever the number of processes.

A task waiting for a permit holds its delivery (unacked) and a concurrency slot. It never
fails and never costs an attempt: at shutdown, or after `RATE_WAIT_SECONDS`, its delivery goes
back to the queue unrun.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

from .errors import ConfigurationError, UnroutableError
from .message import Message, printable
from .topology import check_name, rate_limit_expires_ms, rate_limit_queue, rate_limit_topology
from .transports.base import Transport, one_deadline

log = logging.getLogger("nobs_amqp")

#: The longest a delivery waits for its permits before it goes back to the queue unrun (a
#: worker's consumer ack timeout allows for it; see `acktimeout.fitting_ack_timeout`).
RATE_WAIT_SECONDS = 600.0
#: Between two tries for a permit: about period / N (jittered by half), within these bounds.
MIN_PAUSE_SECONDS = 0.01
MAX_PAUSE_SECONDS = 1.0
#: A limiter's queue is declared again (which keeps it from expiring) this often, at least.
_REDECLARE_FRACTION = 3
_UNITS = {"s": 1, "m": 60, "h": 3600}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*([smh])\s*$")


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most `calls` task starts per `per` (seconds or a timedelta), across every process of
    the project: `RateLimit("webhook.example", 10, per=timedelta(seconds=1))`. Workers and
    tasks given the same name share one limit."""

    name: str
    calls: int
    per: float | timedelta = 1.0

    def __post_init__(self) -> None:
        check_name("rate limit", self.name)
        if isinstance(self.calls, bool) or not isinstance(self.calls, int) or self.calls < 1:
            raise ConfigurationError(f"rate limit {self.name!r}: calls must be a whole number of at least 1")
        seconds = self.per.total_seconds() if isinstance(self.per, timedelta) else self.per
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0.01 <= seconds <= 86_400:
            raise ConfigurationError(f"rate limit {self.name!r}: per must be 0.01 s to 1 day (got {self.per!r})")
        object.__setattr__(self, "per", float(seconds))

    @property
    def seconds(self) -> float:
        return self.per.total_seconds() if isinstance(self.per, timedelta) else self.per

    @property
    def period_ms(self) -> int:
        return max(1, round(self.seconds * 1000))

    def describe(self) -> str:
        """`webhook.example: 10 per 1 s`."""
        return f"{self.name}: {self.calls} per {self.seconds:g} s"

    def pause(self) -> float:
        """How long to wait before trying for a permit again: about period / N, jittered."""
        base = min(max(self.seconds / self.calls, MIN_PAUSE_SECONDS), MAX_PAUSE_SECONDS)
        return base * random.uniform(0.5, 1.5)


RateLimitOption = str | RateLimit | None


def rate_limit(value: RateLimitOption, name: str, owner: str) -> RateLimit | None:
    """A `rate_limit=` option as a RateLimit: one as it is, a string "N/s", "N/m" or "N/h"
    as a limit called `name` (ConfigurationError, naming `owner`, for anything else)."""
    if value is None or isinstance(value, RateLimit):
        return value
    found = _RATE.match(value) if isinstance(value, str) else None
    if found is None or int(found.group(1)) < 1:
        raise ConfigurationError(
            f"{owner}: rate_limit {value!r} is not usable: write 'N/s', 'N/m' or 'N/h' (N a whole "
            f"number of at least 1), or pass RateLimit(name, calls, per=...)"
        )
    return RateLimit(name, int(found.group(1)), per=float(_UNITS[found.group(2)]))


def rate_limits(*limits: RateLimit | None) -> tuple[RateLimit, ...]:
    """The limits a task start takes a permit of (a task's own, then its worker's), each once."""
    found: dict[tuple[str, int, int], RateLimit] = {}
    for limit in limits:
        if limit is not None:
            found.setdefault((limit.name, limit.calls, limit.period_ms), limit)
    return tuple(found.values())


class Waiter(Protocol):
    """One delivery waiting for permits, as `Permits.take` tells of it."""

    def __call__(self, limit: RateLimit, delta: int) -> None:
        """`delta` +1: it starts to wait on `limit`; -1: it stops waiting."""

    def given_back(self, *, stopping: bool) -> None:
        """It got no permit (the consumer stops, or it waited RATE_WAIT_SECONDS): it goes back unrun."""


class Waits:
    """The deliveries of one consumer that wait for permits, per limit: logged, and each change
    of a count told to `tell(limit name, count)` (observers)."""

    def __init__(self, tell: Callable[[str, int], None]) -> None:
        self._tell = tell
        self._counts: dict[str, int] = {}

    def get(self, limit: str) -> int:
        return self._counts.get(limit, 0)

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def of(self, message: Message) -> Waiter:
        return _Waiter(self, printable(message.task), printable(message.message_id))

    def change(self, limit: RateLimit, delta: int) -> None:
        count = self._counts[limit.name] = self.get(limit.name) + delta
        self._tell(limit.name, count)


class _Waiter:
    def __init__(self, waits: Waits, task: str, message_id: str) -> None:
        self._waits = waits
        self._task = task
        self._id = message_id

    def __call__(self, limit: RateLimit, delta: int) -> None:
        if delta > 0:
            log.debug("task %s id %s: waiting for rate limit %s", self._task, self._id, limit.describe())
        self._waits.change(limit, delta)

    def given_back(self, *, stopping: bool) -> None:
        if stopping:
            log.info(
                "task %s id %s: stopping while it waited for a rate limit; back to the queue unrun",
                self._task,
                self._id,
            )
            return
        log.warning(
            "task %s id %s: waited %.0f s for a rate limit; back to the queue unrun (more tasks arrive than "
            "the limit lets start)",
            self._task,
            self._id,
            RATE_WAIT_SECONDS,
        )


class Permits:
    """Takes permits of rate limits for one session's consumers. In this process, the tasks
    waiting on one limit queue behind each other (first come, first served): only one of them
    at a time asks the broker, so the broker sees at most one try per limit per pause."""

    def __init__(self, project: str, transport: Transport, publish_timeout: float) -> None:
        self._project = project
        self._transport = transport
        self._publish_timeout = publish_timeout
        self._locks: dict[str, asyncio.Lock] = {}
        self._declared_at: dict[str, float] = {}

    async def take(
        self,
        limits: Sequence[RateLimit],
        stopping: asyncio.Event,
        waiting: Waiter,
    ) -> bool:
        """Take a permit of each of `limits`, waiting as long as it takes: True once all are
        taken; False (take none further) when `stopping` is set or RATE_WAIT_SECONDS passed.
        `waiting` is told when the delivery starts and stops waiting on a limit, and when it
        got no permit. A permit taken before another one could not be counts as used (fewer
        starts, never more)."""
        until = asyncio.get_running_loop().time() + RATE_WAIT_SECONDS
        for limit in limits:
            if not await self._take(limit, stopping, until, waiting):
                waiting.given_back(stopping=stopping.is_set())
                return False
        return True

    async def _take(self, limit: RateLimit, stopping: asyncio.Event, until: float, waiting: Waiter) -> bool:
        queue = rate_limit_queue(self._project, limit.name, limit.calls, limit.period_ms)
        if await self._try(limit, queue):  # the usual case, below the limit: no lock, no wait
            return True
        waiting(limit, 1)
        try:
            async with self._locks.setdefault(queue, asyncio.Lock()):
                loop = asyncio.get_running_loop()
                while not stopping.is_set() and loop.time() < until:
                    if await self._try(limit, queue):
                        return True
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stopping.wait(), min(limit.pause(), max(0.0, until - loop.time())))
        finally:
            waiting(limit, -1)
        return False

    async def _try(self, limit: RateLimit, queue: str) -> bool:
        """One try for a permit, declaring the limiter's queue when it is due (first use, before it
        could expire, or after it was gone)."""
        with one_deadline(self._publish_timeout):
            for _ in range(2):
                await self._declare(limit, queue)
                try:
                    return await self._transport.take_permit(queue)
                except UnroutableError:
                    self._declared_at.pop(queue, None)  # expired or deleted: declare it again
            return False

    async def _declare(self, limit: RateLimit, queue: str) -> None:
        now = asyncio.get_running_loop().time()
        renew = rate_limit_expires_ms(limit.period_ms) / 1000 / _REDECLARE_FRACTION
        declared = self._declared_at.get(queue)
        if declared is None or now - declared > renew:
            await self._transport.declare(rate_limit_topology(queue, limit.calls, limit.period_ms))
            self._declared_at[queue] = now
