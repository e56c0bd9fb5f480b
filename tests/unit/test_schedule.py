"""Schedules without a broker: the ticks (cron in a time zone, DST, intervals), the missed-tick
policy, the checks at the call site, and a scheduler on memory:// driven by the virtual clock."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from nobs_amqp import (
    ConfigurationError,
    PayloadTypeError,
    Project,
    Schedule,
    Scheduler,
    TaskDefinitionError,
    TaskNotAllowedError,
    Worker,
    models,
)
from nobs_amqp.schedule import SCHEDULE, TICK, Due, tick_id
from nobs_amqp.scheduler import state_queue
from nobs_amqp.testing import drain
from nobs_amqp.transports.memory import MemoryBroker

from ..apps import tasks
from ..support import run_cli

OSLO = ZoneInfo("Europe/Oslo")
WORKER = Worker("unbound")  # never in a project: enough for the tick computations


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, micro: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)


def cron(expression: str, timezone: str = "Europe/Oslo") -> Schedule:
    return Schedule(tasks.record, tasks.Job(key="k"), worker=WORKER, cron=expression, timezone=timezone)


def ticks(schedule: Schedule, start: datetime, end: datetime) -> list[datetime]:
    found, tick = [], schedule.next_tick(start)
    while tick < end:
        found.append(tick)
        tick = schedule.next_tick(tick)
    return found


# -- the ticks, pure -----------------------------------------------------------------------------


def test_cron_follows_the_wall_clock_of_its_time_zone() -> None:
    daily = cron("0 7 * * *")
    # 07:00 in Oslo is 06:00 UTC in winter (CET) and 05:00 UTC in summer (CEST).
    assert daily.next_tick(utc(2024, 3, 29, 12)) == utc(2024, 3, 30, 6)
    assert daily.next_tick(utc(2024, 3, 30, 6)) == utc(2024, 3, 31, 5), "strictly after"
    assert daily.latest_tick(utc(2024, 3, 31, 5)) == utc(2024, 3, 31, 5), "at or before"
    assert daily.latest_tick(utc(2024, 3, 31, 4, 59, 59)) == utc(2024, 3, 30, 6)
    assert cron("0 7 * * *", "UTC").next_tick(utc(2024, 3, 30, 6)) == utc(2024, 3, 30, 7)
    assert cron("@daily").next_tick(utc(2024, 7, 1, 12)) == utc(2024, 7, 1, 22)


def test_cron_on_the_days_daylight_saving_time_changes() -> None:
    at_0230 = cron("30 2 * * *")
    # Spring (2024-03-31, 02:00 -> 03:00): 02:30 does not exist; it runs at 03:00 CEST.
    assert at_0230.next_tick(utc(2024, 3, 30, 12)) == utc(2024, 3, 31, 1)
    # Autumn (2024-10-27, 03:00 -> 02:00): 02:30 comes twice; a fixed-time job runs once, the first time.
    assert ticks(at_0230, utc(2024, 10, 26, 12), utc(2024, 10, 28, 12)) == [
        utc(2024, 10, 27, 0, 30),
        utc(2024, 10, 28, 1, 30),
    ]
    assert at_0230.latest_tick(utc(2024, 10, 27, 1, 45)) == utc(2024, 10, 27, 0, 30), "not the repeated 02:30"
    # A job with `*` in its hour runs by the wall clock: 23 hours on the spring day, 25 in autumn.
    hourly = cron("0 * * * *")
    assert len(ticks(hourly, utc(2024, 3, 30, 22, 59), utc(2024, 3, 31, 21, 59))) == 23
    autumn = ticks(hourly, utc(2024, 10, 26, 21, 59), utc(2024, 10, 27, 22, 59))
    assert len(autumn) == 25
    assert autumn == [utc(2024, 10, 26, 22) + timedelta(hours=n) for n in range(25)], "an hour apart, always"


def test_intervals_tick_at_whole_multiples_since_the_epoch() -> None:
    five = Schedule(tasks.record, tasks.Job(key="k"), worker=WORKER, every=timedelta(minutes=5), timezone="Asia/Tokyo")
    assert five.next_tick(utc(2024, 5, 1, 10, 2, 3)) == utc(2024, 5, 1, 10, 5)
    assert five.next_tick(utc(2024, 5, 1, 10, 5)) == utc(2024, 5, 1, 10, 10), "strictly after"
    assert five.latest_tick(utc(2024, 5, 1, 10, 5)) == utc(2024, 5, 1, 10, 5), "at or before"
    assert five.latest_tick(utc(2024, 5, 1, 10, 9, 59, 999999)) == utc(2024, 5, 1, 10, 5)
    every_90 = Schedule(tasks.record, tasks.Job(key="k"), worker=WORKER, every=90)
    assert every_90.next_tick(utc(1970, 1, 1)) == utc(1970, 1, 1, 0, 1, 30)
    assert five.describe() == "every 300 s"
    assert cron("0 7 * * *").describe() == "cron '0 7 * * *' Europe/Oslo"


def test_missed_ticks_enqueue_the_latest_once_and_skip_the_older_ones() -> None:
    five = Schedule(tasks.record, tasks.Job(key="k"), worker=WORKER, every=300)
    assert five.due(utc(2024, 5, 1, 10), utc(2024, 5, 1, 10, 4, 59)) is None, "nothing came yet"
    assert five.due(utc(2024, 5, 1, 10), utc(2024, 5, 1, 10, 5)) == Due(utc(2024, 5, 1, 10, 5)), "on time"
    assert five.due(utc(2024, 5, 1, 10), utc(2024, 5, 1, 10, 7)) == Due(utc(2024, 5, 1, 10, 5)), "late"
    # Three ticks came while no scheduler ran: the latest once; the first skipped is said.
    missed = five.due(utc(2024, 5, 1, 10), utc(2024, 5, 1, 10, 17, 30))
    assert missed == Due(utc(2024, 5, 1, 10, 15), skipped_from=utc(2024, 5, 1, 10, 5))
    assert five.due(utc(2024, 5, 1, 10, 15), utc(2024, 5, 1, 10, 17, 30)) is None, "done already"
    assert five.due(utc(2024, 5, 1, 10, 20), utc(2024, 5, 1, 10, 17)) is None, "a mark ahead of this clock"


def test_a_mark_at_the_edges_of_time_never_makes_the_tick_computation_raise() -> None:
    """A mark comes from the broker: far past, far future, odd offsets. `due` answers for each."""
    now = utc(2024, 5, 1, 10, 0, 30)
    schedules = [
        cron("0 7 * * *", "America/New_York"),
        cron("30 2 * * *"),
        Schedule(tasks.record, tasks.Job(key="k"), worker=WORKER, every=1),
        Schedule(tasks.record, tasks.Job(key="k"), worker=WORKER, every=timedelta(days=7)),
    ]
    odd = [timezone(timedelta(hours=23, minutes=59)), timezone(timedelta(hours=-23, minutes=-59)), UTC]
    past = [datetime.min.replace(tzinfo=zone) for zone in odd] + [utc(1969, 12, 31, 23, 59, 59)]
    future = [datetime.max.replace(tzinfo=zone) for zone in odd] + [utc(9999, 12, 31, 23, 59, 59)]
    for schedule in schedules:
        latest = schedule.latest_tick(now)
        for mark in past:
            due = schedule.due(mark, now)
            assert due is not None, (schedule, mark)
            assert due.tick == latest
            assert due.skipped_from is not None and due.skipped_from <= latest
        for mark in future:
            assert schedule.due(mark, now) is None, (schedule, mark)


def test_a_tick_has_an_id_derived_from_the_project_schedule_and_time() -> None:
    tick = utc(2024, 5, 1, 7)
    namespace = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/nobs-amqp/schedule")
    expected = uuid.uuid5(namespace, "p/s/2024-05-01T07:00:00.000Z")
    assert tick_id("p", "s", tick) == expected.hex
    assert tick_id("p", "s", tick.astimezone(OSLO)) == expected.hex, "the same instant in any zone"
    others = {tick_id("q", "s", tick), tick_id("p", "t", tick), tick_id("p", "s", tick + timedelta(seconds=1))}
    assert expected.hex not in others
    assert len(others) == 3


# -- checks at the call site ---------------------------------------------------------------------


def test_a_schedule_is_checked_where_it_is_written() -> None:
    job = tasks.Job(key="k")
    with pytest.raises(TaskDefinitionError, match="lambda"):
        Schedule(lambda job: None, job, worker=WORKER, every=60)
    with pytest.raises(PayloadTypeError, match="pass a Job"):
        Schedule(tasks.record, tasks.SyncJob(key="k", numbers=[]), worker=WORKER, every=60)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="not a cron expression"):
        Schedule(tasks.record, job, worker=WORKER, cron="61 * * * *")
    with pytest.raises(ConfigurationError, match="never matches"):
        Schedule(tasks.record, job, worker=WORKER, cron="0 0 31 2 *")
    with pytest.raises(ConfigurationError, match="either cron"):
        Schedule(tasks.record, job, worker=WORKER, cron="* * * * *", every=60)
    with pytest.raises(ConfigurationError, match="either cron"):
        Schedule(tasks.record, job, worker=WORKER)
    for every in (0.5, 1.5, -1, float("nan"), timedelta(milliseconds=1500)):
        with pytest.raises(ConfigurationError, match="whole number of seconds"):
            Schedule(tasks.record, job, worker=WORKER, every=every)
    with pytest.raises(ConfigurationError, match="unknown time zone 'Europe/Olso'"):
        Schedule(tasks.record, job, worker=WORKER, cron="0 7 * * *", timezone="Europe/Olso")
    with pytest.raises(ConfigurationError, match="is not usable"):
        Schedule(tasks.record, job, worker=WORKER, every=60, name="a/b")
    assert Schedule(tasks.record, job, worker=WORKER, every=60).name == "tests.apps.tasks:record"
    assert models.Schedule is Schedule


def test_a_project_checks_its_schedules_as_queue_would() -> None:
    job = tasks.Job(key="k")
    outside = Worker("outside")
    with pytest.raises(ConfigurationError, match="worker 'outside', which is not in project 'p'"):
        Project("p", workers=[Worker("inside")], schedules=[Schedule(tasks.record, job, worker=outside, every=60)])
    inside = Worker("inside")
    twice = [Schedule(tasks.record, job, worker=inside, every=60) for _ in range(2)]
    with pytest.raises(ConfigurationError, match=r"two schedules named 'tests\.apps\.tasks:record'"):
        Project("p", workers=[inside], schedules=twice, packages=["tests.apps"])
    w = Worker("w")
    with pytest.raises(TaskNotAllowedError, match="outside project 'q'"):
        Project("q", workers=[w], packages=["examples"], schedules=[Schedule(tasks.record, job, worker=w, every=60)])
    inside = Worker("inside")
    named = [Schedule(tasks.record, job, worker=inside, every=60, name=n) for n in ("a", "b")]
    project = Project("p", workers=[inside], schedules=named, packages=["tests.apps"])
    assert list(project.schedules) == ["a", "b"]
    with pytest.raises(ConfigurationError, match="no schedules"):
        Scheduler(Project("empty", workers=[Worker("w2")]))


# -- a scheduler on memory:// --------------------------------------------------------------------


@pytest.fixture
def memory() -> Iterator[str]:
    url = f"memory://{uuid.uuid4().hex}"
    yield url
    MemoryBroker.forget(url)


def scheduled_project(
    url: str, worker: str, *schedules: tuple[str, dict[str, object]], signing_key: str | None = None
) -> Project:
    """A project on `url` whose worker `worker` has the schedules named, each of tasks.record."""
    target = Worker(worker)
    made = [
        Schedule(tasks.record, tasks.Job(key=f"{worker}-{name}"), worker=target, name=name, **options)  # type: ignore[arg-type]
        for name, options in schedules
    ]
    return Project(
        "sched", workers=[target], schedules=made, url=url, modules=["tests.apps.tasks"], signing_key=signing_key
    )


@pytest.mark.timeout(30)
async def test_a_day_of_ticks_runs_in_no_time_on_the_virtual_clock(memory: str) -> None:
    key = uuid.uuid4().hex[:8]
    project = scheduled_project(
        memory,
        key,
        ("five", {"every": timedelta(minutes=5)}),
        ("seven", {"cron": "0 7 * * *", "timezone": "Europe/Oslo"}),
        signing_key="a signing key of at least 16 bytes",  # ticks are signed, as queue() signs
    )
    broker = MemoryBroker.named(memory)
    seen: dict[str, tuple[object, object]] = {}  # message id -> (schedule, tick)
    started = time.monotonic()
    async with project:
        clock, scheduler = project.session.transport, Scheduler(project)
        start = project.session.now()
        ran = 0
        while (upcoming := await scheduler.step()) is not None:
            for message in broker.messages(key):
                tick = datetime.fromisoformat(str(message.headers[TICK]))
                assert message.message_id == tick_id("sched", str(message.headers[SCHEDULE]), tick)
                assert message.attempt == 1
                assert "x-nobs-signature" in message.headers
                entry = (message.headers[SCHEDULE], message.headers[TICK])
                assert seen.setdefault(message.message_id, entry) == entry
            ran += await drain(project)
            if upcoming > start + timedelta(days=1):
                break
            await clock.advance((upcoming - project.session.now()).total_seconds())  # type: ignore[attr-defined]
        assert await project.session.transport.message_count(state_queue("sched")) == 1, "one state message"
    assert time.monotonic() - started < 10
    assert ran == len(seen) == 288 + 1, "every tick of a day enqueued once and run by the worker"
    assert len(tasks.calls(f"{key}-five")) == 288
    assert len(tasks.calls(f"{key}-seven")) == 1
    [seven] = [tick for schedule, tick in seen.values() if schedule == "seven"]
    assert datetime.fromisoformat(str(seven)).astimezone(OSLO).hour == 7


@pytest.mark.timeout(30)
async def test_a_scheduler_taking_over_goes_on_where_the_last_one_stopped(
    memory: str, caplog: pytest.LogCaptureFixture
) -> None:
    key = uuid.uuid4().hex[:8]
    first = scheduled_project(memory, key, ("five", {"every": 300}))
    second = scheduled_project(memory, key, ("five", {"every": 300}), ("hourly", {"cron": "0 * * * *"}))
    broker = MemoryBroker.named(memory)
    caplog.set_level(logging.INFO, logger="nobs_amqp")
    async with first, second:
        clock = first.session.transport
        one, other = Scheduler(first), Scheduler(second)
        upcoming = await one.step()
        assert one.active
        assert await other.step() is None, "standby while the first one is active"
        assert not other.active
        for _ in range(3):  # three ticks by the first one
            assert upcoming is not None
            await clock.advance((upcoming - first.session.now()).total_seconds())  # type: ignore[attr-defined]
            upcoming = await one.step()
        assert await other.step() is None
        last = max(str(message.headers[TICK]) for message in broker.messages(key))
        await first.close()  # as when its process dies: its lease ends with its connection
        # An hour and a bit with no scheduler: twelve ticks missed, and one of the hourly schedule.
        await clock.advance(3600 + 90)  # type: ignore[attr-defined]
        taken_over_at = second.session.now()
        await other.step()
        assert other.active
    messages = broker.messages(key)
    ids = [message.message_id for message in messages]
    assert len(ids) == len(set(ids)) == 4, "three by the first, then only the latest missed tick"
    by_second = messages[-1]
    assert by_second.headers[SCHEDULE] == "five"
    assert str(by_second.headers[TICK]) > last
    assert taken_over_at - datetime.fromisoformat(str(by_second.headers[TICK])) < timedelta(minutes=5)
    assert "schedule five: skipped the ticks from" in caplog.text
    assert "schedule hourly: cron '0 * * * *' UTC, new, first tick" in caplog.text, "a new schedule starts after now"


# -- the command line ----------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_the_schedule_command_lists_and_refuses_memory() -> None:
    app = ("--app", "tests.apps.schedules:project")
    code, output = await run_cli(*app, "schedule", env={"NOBS_AMQP_URL": "memory://"})
    assert code == 2, output
    assert "schedule needs RabbitMQ: NOBS_AMQP_URL is memory://" in output
    code, output = await run_cli(*app, "schedule", "--list", env={"NOBS_AMQP_URL": "memory://"})
    assert code == 0, output
    assert "every-second" in output
    assert "every 1 s" in output
    assert "tests.apps.tasks:record on unused" in output
    code, output = await run_cli("--app", "tests.apps.cli_app:project", "schedule", env={"NOBS_AMQP_URL": "memory://"})
    assert code == 2, output
    assert "project 'nobs-test' has no schedules: add them with Project(schedules=[...])" in output
