"""Schedules: a task a project enqueues periodically, and the pure computation of its ticks.

A schedule has a cron expression in a time zone (croniter, with aware datetimes) or a fixed
interval. Its ticks are a pure function of time: every process computes the same ones, and a
tick's message id is derived from the project, the schedule's name and the tick's time, so the
same tick always has the same id. Running them (one active process, its state on the broker)
is `scheduler.py`.

Daylight saving time, for cron: a wall-clock time the spring change skips is run at the first
valid time after it (02:30 on the night clocks go from 02:00 to 03:00 runs at 03:00); a
wall-clock time the autumn change repeats runs once, at its first occurrence, when the minute
and hour fields are fixed ("30 2 * * *"), and at both occurrences when either has a `*`
("*/30 * * * *", "@hourly"): as ISC cron does.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .errors import ConfigurationError
from .message import Message, format_time, printable
from .session import Session
from .tasks import TaskSpec, reference_of
from .worker import Extras, Worker

if TYPE_CHECKING:
    from croniter import croniter

#: Headers a tick's message carries besides the usual ones: the schedule's name, the tick's time.
SCHEDULE = "x-nobs-schedule"
TICK = "x-nobs-tick"
#: The uuid5 namespace of tick message ids: uuid5(NAMESPACE, "project/schedule/tick time").hex.
#: It is uuid5(NAMESPACE_URL, "https://github.com/nobs-amqp/schedule"), written out: computing it
#: would import hashlib in every process that imports nobs_amqp.
NAMESPACE = uuid.UUID("57a82f71-2e01-5d06-9b33-53a7ff5f69bd")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
P = TypeVar("P")


class Home(Protocol):
    """What a schedule needs of its project (a `Project`)."""

    @property
    def name(self) -> str: ...


def tick_id(project: str, schedule: str, tick: datetime) -> str:
    """The message id of `schedule`'s tick at `tick` in `project`: the same wherever it is computed."""
    return uuid.uuid5(NAMESPACE, f"{project}/{schedule}/{format_time(tick)}").hex


@dataclass(frozen=True, slots=True)
class Due:
    """What a schedule has to enqueue now: `tick`, the latest tick that came; `skipped_from`,
    the first of the older ticks that came too and are skipped (None when there were none)."""

    tick: datetime
    skipped_from: datetime | None = None


class Schedule:
    """Enqueue `fn(payload)` on `worker` at each tick of `cron` (in `timezone`) or `every` interval.

    `cron`: five fields (minute hour day month weekday; a sixth, seconds, may follow), or an
    alias such as "@daily", read in `timezone` (a zoneinfo name or a tzinfo; default UTC).
    `every` (seconds or a timedelta, whole seconds, at least 1): ticks at whole multiples of it
    since 1970-01-01 00:00 UTC, so every=300 ticks at :00, :05, :10... whatever the time zone.
    `name` (default: the task reference, module:function) must be unique in the project: give
    one when a function has two schedules. `fn` and `payload` are checked here and when the
    project is built, as `queue()` checks them.
    """

    def __init__(
        self,
        fn: Callable[[P], object],
        payload: P,
        *,
        worker: Worker,
        cron: str | None = None,
        every: float | timedelta | None = None,
        timezone: str | tzinfo = "UTC",
        name: str | None = None,
        priority: int | None = None,
    ) -> None:
        reference = reference_of(fn)  # a lambda, a nested function, one in __main__: refused here
        TaskSpec(fn, reference).encode(payload)  # a payload of the wrong type: refused here
        self.name = reference if name is None else _checked_name(name)
        self.fn: Callable[[Any], object] = fn
        self.payload: object = payload
        self.worker = worker
        self.priority = priority
        self.zone = _zone(timezone, self.name)
        if (cron is None) == (every is None):
            raise ConfigurationError(f"schedule {self.name!r}: give either cron='...' or every=... (one of them)")
        self.cron = cron
        self.every = _interval(every, self.name) if every is not None else None
        self._fixed = _check_cron(cron, self.zone, self.name) if cron is not None else False
        self.reference = reference
        self._body: bytes | None = None

    def __repr__(self) -> str:
        return f"Schedule({self.name!r}, {self.describe()}, worker={self.worker.name!r})"

    def describe(self) -> str:
        """The timing, as a person reads it: "cron '0 7 * * *' Europe/Oslo" or "every 300 s"."""
        if self.every is not None:
            return f"every {self.every // timedelta(seconds=1)} s"
        return f"cron {self.cron!r} {self.zone}"

    def check(self, project: Home) -> None:
        """Called by `Project(schedules=[...])`: the worker is in `project`, and the worker takes
        `fn(payload)` (the checks of `queue()`)."""
        if self.worker._project is not project:
            raise ConfigurationError(
                f"schedule {self.name!r} uses worker {self.worker.name!r}, which is not in project "
                f"{project.name!r}: add it to Project(workers=[...])"
            )
        self.reference, self._body, _ = self.worker._checked(self.fn, self.payload, None, self.priority)

    # -- ticks ---------------------------------------------------------------------------------

    def next_tick(self, after: datetime) -> datetime:
        """The first tick strictly after `after` (an aware datetime), in UTC."""
        if self.every is not None:
            return EPOCH + ((after - EPOCH) // self.every + 1) * self.every
        assert self.cron is not None
        ticks = _croniter()(self.cron, after.astimezone(self.zone))
        while True:
            tick: datetime = ticks.get_next(datetime)
            if not self._repeated(tick):
                return tick.astimezone(UTC)

    def latest_tick(self, at: datetime) -> datetime:
        """The last tick at or before `at` (an aware datetime), in UTC."""
        if self.every is not None:
            return EPOCH + ((at - EPOCH) // self.every) * self.every
        assert self.cron is not None
        ticks = _croniter()(self.cron, at.astimezone(self.zone) + _MICROSECOND)
        while True:
            tick: datetime = ticks.get_prev(datetime)
            if not self._repeated(tick):
                return tick.astimezone(UTC)

    def due(self, mark: datetime, now: datetime) -> Due | None:
        """What to enqueue `now` when every tick up to `mark` is done: the latest tick in
        (mark, now], once; older ticks in that span (missed while no scheduler ran) are skipped.
        Any aware `mark` will do (it comes from the broker): one after `now` only compares, and
        ticks are counted from 1970 at the earliest, so a mark at datetime's edges cannot overflow."""
        latest = self.latest_tick(now)
        if latest <= mark:
            return None
        first = self.next_tick(max(mark, EPOCH))
        return Due(latest, first if first < latest else None)

    def _repeated(self, tick: datetime) -> bool:
        """Whether `tick` is the second occurrence of a wall-clock time the autumn change repeats,
        for a fixed-time expression (ISC cron runs those once)."""
        if not self._fixed:
            return False
        first = tick.replace(tzinfo=self.zone, fold=0)  # the first occurrence of its wall-clock time
        return first.utcoffset() != tick.utcoffset()

    # -- messages ------------------------------------------------------------------------------

    def message_id(self, project: str, tick: datetime) -> str:
        return tick_id(project, self.name, tick)

    def message(self, session: Session, tick: datetime) -> Message:
        """The first attempt of the task for `tick`, as `queue()` builds it, with the tick's id."""
        if self._body is None:
            raise ConfigurationError(f"schedule {self.name!r} is in no project: add it with Project(schedules=[...])")
        base = self.worker._message(session, self.reference, self._body, 0, Extras(self.priority))
        headers = {**base.headers, SCHEDULE: self.name, TICK: format_time(tick)}
        return replace(base, message_id=self.message_id(session.project, tick), headers=headers)


def _checked_name(name: str) -> str:
    if not isinstance(name, str) or not name or len(name) > 200 or printable(name) != name or "/" in name:
        raise ConfigurationError(
            f"schedule name {name!r} is not usable: use up to 200 printable characters, without '/'"
        )
    return name


def _croniter() -> type[croniter]:
    """croniter, imported when a project has a cron schedule (a plain worker never needs it)."""
    from croniter import croniter

    return croniter


def _zone(timezone: str | tzinfo, name: str) -> tzinfo:
    if isinstance(timezone, tzinfo):
        return timezone
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError  # only for schedules

    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise ConfigurationError(
            f"schedule {name!r}: unknown time zone {timezone!r}; use an IANA name such as 'Europe/Oslo' or 'UTC'"
        ) from None


def _interval(every: float | timedelta, name: str) -> timedelta:
    try:
        step = every if isinstance(every, timedelta) else timedelta(seconds=every)
    except (TypeError, ValueError, OverflowError):
        step = timedelta(0)
    if step < timedelta(seconds=1) or step % timedelta(seconds=1):
        raise ConfigurationError(
            f"schedule {name!r}: every must be a whole number of seconds, at least 1 (got {every})"
        )
    return step


def _check_cron(cron: str, zone: tzinfo, name: str) -> bool:
    """Whether `cron` runs at fixed times (no `*` in its minute and hour fields); raises
    ConfigurationError for an expression croniter does not take, or one that never matches."""
    from croniter import CroniterBadDateError, croniter

    if not isinstance(cron, str) or not croniter.is_valid(cron):
        raise ConfigurationError(
            f"schedule {name!r}: {cron!r} is not a cron expression; use five fields, "
            f"minute hour day month weekday (e.g. '0 7 * * *'), or an alias such as '@daily'"
        )
    try:
        croniter(cron, datetime.now(zone)).get_next(datetime)
    except CroniterBadDateError:
        raise ConfigurationError(f"schedule {name!r}: {cron!r} never matches a date") from None
    minute, hour = croniter(cron).expressions[:2]
    return "*" not in str(minute) and "*" not in str(hour)
