"""The scheduler: enqueues a project's schedules, one process active at a time, on any broker.

Election: every scheduler of a project tries to take the lease `P.schedule.leader` (on RabbitMQ,
an exclusive queue: one connection at a time may hold it, and the broker deletes it when that
connection closes or is lost). The holder is active; the others try again every second, so one
takes over about a second after the active one stops or dies. The active one checks that it
still holds the lease before each tick it enqueues.

State: the durable queue `P.schedule.state` holds one message (`x-max-length` 1, dropping the
head): per schedule, the time of the last tick enqueued. The active scheduler publishes it,
confirmed, after each tick; one that takes over reads it (acking what it read only after its own
copy is confirmed), so it goes on where the last one stopped. Anyone who may publish there can
write it, so it is checked: with a signing key, a state the project did not sign is ignored; a
name no schedule has is dropped; a tick that is unreadable, out of range or in the future costs
only its schedule, which starts afresh.

Ticks: each due tick is enqueued once, as `queue()` would (signed, declared, confirmed), with an
id derived from the tick (`schedule.tick_id`). Ticks missed while no scheduler was active are
not all made up: the latest one is enqueued once, the older ones are skipped (and logged). A
schedule the state does not know yet starts with its first tick after now. A scheduler killed
between a tick's confirm and its state's may leave that tick to be enqueued again by the next
one, with the same message id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
import weakref
from collections.abc import Callable, Container, Iterable, Mapping
from datetime import datetime, timedelta
from types import TracebackType
from typing import Protocol

import orjson

from .errors import ConfigurationError, NobsAmqpError
from .message import Message, format_time, parse_time, printable
from .schedule import Due, Schedule
from .session import Session
from .signing import Signer
from .topology import QueueSpec, ServerVersion, Topology
from .transports.base import Delivery, Subscription, Transport, one_deadline

log = logging.getLogger("nobs_amqp")

#: How often a standby tries to take the lead (and the active one checks it still has it).
LEASE_SECONDS = 1.0
#: How long to wait after a failure (broker unreachable, a refused publish) before trying again.
RETRY_SECONDS = 5.0
#: How long a lease check may take before the scheduler counts itself on standby.
LEASE_TIMEOUT_SECONDS = 10.0
#: How long taking over waits for the state messages it counted.
READ_SECONDS = 5.0
#: The `type` of the state message.
STATE_TYPE = "nobs_amqp:schedule-state"
#: How far past this scheduler's clock a last tick in the state may be (the clock of the process
#: that wrote it may run a little ahead); a later one is refused, and its schedule starts afresh.
CLOCK_SKEW = timedelta(seconds=30)

#: Signs the state message; says why one is not signed by the project (None when it is).
Sign = Callable[[Message], Message]
Check = Callable[[Message], str | None]

#: The scheduler running on each transport (connection): a second one there would share its lease.
_RUNNING: weakref.WeakKeyDictionary[Transport, Scheduler] = weakref.WeakKeyDictionary()


def leader_queue(project: str) -> str:
    """The lease the active scheduler of `project` holds (an exclusive queue on RabbitMQ)."""
    return f"{project}.schedule.leader"


def state_queue(project: str) -> str:
    """The queue of the one message saying, per schedule, the last tick enqueued."""
    return f"{project}.schedule.state"


def state_topology(project: str, server: ServerVersion) -> Topology:
    arguments: dict[str, object] = {"x-queue-type": "quorum", "x-max-length": 1, "x-overflow": "drop-head"}
    if server >= (4,):
        arguments["x-delivery-limit"] = -1  # 4.0's default of 20 would drop it after 20 interrupted reads
    return Topology(queues=(QueueSpec(state_queue(project), arguments),))


class Owner(Protocol):
    """What a scheduler needs of its project (a `Project`)."""

    @property
    def name(self) -> str: ...

    @property
    def schedules(self) -> Mapping[str, Schedule]: ...

    @property
    def session(self) -> Session: ...


class Scheduler:
    """Enqueues the ticks of `project`'s schedules while it is the active scheduler of the project.

    Run any number of them (`nobs-amqp schedule`, or `async with Scheduler(project):` in the
    background of an open project): one is active, the others stand by and take over within
    seconds. `run()` until stopped; `step()` once (tests on memory:// call it between moves of
    the virtual clock).
    """

    def __init__(self, project: Owner) -> None:
        if not project.schedules:
            raise ConfigurationError(
                f"project {project.name!r} has no schedules: add them with Project(schedules=[...])"
            )
        self.project = project
        self.active = False
        self.enqueued = 0  # ticks this scheduler enqueued
        self._marks: dict[str, datetime] = {}  # schedule -> its last tick done
        self._told_standby = False
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"Scheduler({self.project.name!r}, active={self.active})"

    @property
    def schedules(self) -> Iterable[Schedule]:
        return self.project.schedules.values()

    # -- running -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Take part until `stop` is set (forever without one), then give up the lead if held."""
        stop = stop or asyncio.Event()
        try:
            while not stop.is_set():
                wait = await self._attempt()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await stop.wait()
        finally:
            await self.resign()

    async def _attempt(self) -> float:
        """One step; how long to wait before the next."""
        try:
            upcoming = await self.step()
        except (NobsAmqpError, TimeoutError) as exc:
            why = str(exc) or "the broker did not answer in time"
            log.warning("scheduler %s: %s; trying again in %.0f s", self.project.name, why, RETRY_SECONDS)
            return RETRY_SECONDS
        except Exception:  # a scheduler outlives whatever goes wrong in one step
            log.exception("scheduler %s: step failed; trying again in %.0f s", self.project.name, RETRY_SECONDS)
            return RETRY_SECONDS
        if upcoming is None:
            return LEASE_SECONDS
        return max(0.0, min(LEASE_SECONDS, (upcoming - self.project.session.now()).total_seconds()))

    async def step(self) -> datetime | None:
        """Take or keep the lead, and enqueue every tick that is due now; return when the next
        tick is due (None on standby: another scheduler of the project is active)."""
        session = self.project.session
        transport = session.transport
        if _RUNNING.setdefault(transport, self) is not self:
            raise ConfigurationError(f"project {self.project.name!r} already runs a Scheduler in this process")
        try:
            async with asyncio.timeout(LEASE_TIMEOUT_SECONDS):
                lease = await transport.lease(leader_queue(self.project.name))
        except Exception:
            self._stand_by("cannot check the lease")
            raise
        if lease == "busy":
            self._stand_by("another process is active")
            return None
        if lease == "taken" or not self.active:
            await self._take_over(session)
        now = session.now()
        for schedule in self.schedules:
            due = schedule.due(self._marks[schedule.name], now)
            if due is not None:
                await self._enqueue(session, schedule, due)
        return min(schedule.next_tick(now) for schedule in self.schedules)

    async def resign(self) -> None:
        """Give up the lead (if held) so that another scheduler takes over at once."""
        with contextlib.suppress(NobsAmqpError):
            transport = self.project.session.transport
            if _RUNNING.get(transport) is self:
                del _RUNNING[transport]
            if self.active:
                self.active = False
                await transport.release(leader_queue(self.project.name))
                log.info("scheduler %s: stopped, no longer active", self.project.name)

    async def __aenter__(self) -> Scheduler:
        self._stop.clear()
        self._task = asyncio.create_task(self.run(self._stop))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    def _stand_by(self, why: str) -> None:
        if self.active or not self._told_standby:
            level = logging.WARNING if self.active else logging.INFO
            log.log(level, "scheduler %s: standby (%s); trying every %.0f s", self.project.name, why, LEASE_SECONDS)
            self._told_standby = True
        self.active = False

    # -- the state on the broker ---------------------------------------------------------------

    async def _take_over(self, session: Session) -> None:
        """Read the state the last active scheduler left, and publish it as this one's own."""
        transport = session.transport
        name = self.project.name
        await transport.declare(state_topology(name, transport.server_version))
        read: list[Delivery] = []
        subscription = await _read(transport, state_queue(name), read)
        try:
            now = session.now()
            check = None if session.signer is None else _state_signing(session.signer, state_queue(name))[1]
            marks = _merge((delivery.message for delivery in read), self.project.schedules, now, check, name)
            fresh = [schedule.name for schedule in self.schedules if schedule.name not in marks]
            marks.update(dict.fromkeys(fresh, now))
            self._marks = marks
            await self._save(session)
            for delivery in read:
                await delivery.ack()
        finally:
            if subscription is not None:
                await subscription.cancel()
                await subscription.close()
        self.active = True
        self._told_standby = False
        log.info("scheduler %s: active, %d schedule(s)", name, len(self.project.schedules))
        for schedule in self.schedules:
            mark = self._marks[schedule.name]
            state = f"new, first tick {format_time(schedule.next_tick(now))}" if schedule.name in fresh else ""
            log.info(
                "schedule %s: %s, %s", schedule.name, schedule.describe(), state or f"last tick {format_time(mark)}"
            )

    async def _save(self, session: Session) -> None:
        ticks = {name: format_time(mark) for name, mark in sorted(self._marks.items())}
        queue = state_queue(self.project.name)
        message = Message(
            orjson.dumps({"ticks": ticks}), STATE_TYPE, uuid.uuid4().hex, self.project.name, session.now()
        )
        if session.signer is not None:
            message = _state_signing(session.signer, queue)[0](message)
        with one_deadline(session.publish_timeout):
            await session.transport.publish("", queue, message)

    async def _enqueue(self, session: Session, schedule: Schedule, due: Due) -> None:
        message = schedule.message(session, due.tick)
        await session.send(schedule.worker, message, 0)
        self._marks[schedule.name] = due.tick
        self.enqueued += 1
        if due.skipped_from is not None:
            log.warning(
                "schedule %s: skipped the ticks from %s on, missed while no scheduler was active",
                schedule.name,
                format_time(due.skipped_from),
            )
        log.info(
            "schedule %s: enqueued tick %s on %s, message id %s",
            schedule.name,
            format_time(due.tick),
            schedule.worker.name,
            message.message_id,
        )
        await self._save(session)


async def _read(transport: Transport, queue: str, into: list[Delivery]) -> Subscription | None:
    """Take the state messages in `queue` (normally one) into `into`, unsettled: the caller acks
    them once its own copy is confirmed, and closes the subscription (which gives back the rest)."""
    count = min(await transport.message_count(queue), 100)
    if count == 0:
        return None
    arrived = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        into.append(delivery)
        if len(into) >= count:
            arrived.set()

    subscription = await transport.consume(queue, count, handler)
    with contextlib.suppress(TimeoutError):  # fewer than counted (taken meanwhile): what came is enough
        async with asyncio.timeout(READ_SECONDS):
            await arrived.wait()
    return subscription


def _state_signing(signer: Signer, destination: str) -> tuple[Sign, Check]:
    """How the state message, published to the queue `destination`, is signed and checked: the one
    place the scheduler calls the signer (the signature binds the message to that queue)."""
    return (lambda message: signer.sign(message, destination)), (lambda message: signer.problem(message, destination))


def _merge(
    messages: Iterable[Message], known: Container[str], now: datetime, check: Check | None, project: str
) -> dict[str, datetime]:
    """Per schedule in `known`, the latest tick any of the state `messages` says was enqueued, as
    far as it can be believed. A message that is unreadable or (`check`, with a signing key) not
    signed by the project is ignored; a name no schedule has is dropped; a tick that is
    unreadable, out of range or after `now` (give or take CLOCK_SKEW) is left out, so that its
    schedule starts afresh. Each is logged; none raises."""
    marks: dict[str, datetime] = {}
    unknown: set[str] = set()
    for message in messages:
        for name, value in _ticks(message, check, project).items():
            if name not in known:
                unknown.add(name)
            elif (moment := _mark(value, now, name, project)) is not None:
                marks[name] = max(marks.get(name, moment), moment)
    if unknown:
        names = printable(", ".join(sorted(unknown)), 200)
        log.info(
            "scheduler %s: dropped %d name(s) no schedule of the project has from the state: %s",
            project,
            len(unknown),
            names,
        )
    return marks


def _ticks(message: Message, check: Check | None, project: str) -> dict[str, object]:
    """The ticks a state message lists (empty, logged, when it is not to be believed)."""
    why = check(message) if check is not None else None
    if why is None:
        try:
            ticks = orjson.loads(message.body)["ticks"]
        except (orjson.JSONDecodeError, TypeError, KeyError):
            ticks = None
        if isinstance(ticks, dict):
            return ticks
        why = "unreadable: not JSON with an object of ticks"
    log.warning("scheduler %s: ignored state message %s: %s", project, printable(message.message_id), why)
    return {}


def _mark(value: object, now: datetime, name: str, project: str) -> datetime | None:
    """The last tick of schedule `name` the state says, if it is a time in UTC's range and not in the future."""
    moment = parse_time(value)  # in UTC, or None
    if moment is None:
        why = f"unreadable or out of range ({printable(value, 80)})"
    elif moment > now + CLOCK_SKEW:
        why = f"in the future ({format_time(moment)})"
    else:
        return moment
    log.warning("scheduler %s: schedule %s starts afresh: its last tick in the state is %s", project, name, why)
    return None
