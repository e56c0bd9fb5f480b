"""A forged or damaged `P.schedule.state` (issue 17, item 4): whatever message sits in the state
queue when a scheduler takes over, the project's schedules go on ticking on time and nothing
raises; with a signing key, only a state the project signed is believed. On RabbitMQ (the state
published with a raw aio-pika publish, as anyone with publish rights could) and on memory://."""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import aio_pika
import orjson
import pytest

from nobs_amqp import Project, Schedule, Scheduler, Worker
from nobs_amqp.message import Message, format_time, wall_clock
from nobs_amqp.schedule import TICK
from nobs_amqp.scheduler import STATE_TYPE, state_queue, state_topology
from nobs_amqp.signing import Signer
from nobs_amqp.transports.memory import MemoryBroker

from ..apps import tasks
from ..support import eventually, take_messages

KEY = "a signing key of at least 16 bytes"
#: In a forged state: replaced by a time a few seconds before the test publishes it.
NOW = "{now}"


@pytest.fixture
async def state(name: str, url: str) -> AsyncIterator[str]:
    """The project name `name`'s state queue, deleted afterwards on RabbitMQ."""
    yield state_queue(name)
    if url.startswith("memory://"):
        return
    connection = await aio_pika.connect(url)
    try:
        await (await connection.channel()).queue_delete(state_queue(name))
    finally:
        await connection.close()


def every_second(url: str, name: str, signing_key: str | None = None) -> Project:
    worker = Worker(name)
    tick = Schedule(tasks.record, tasks.Job(key=name), worker=worker, every=1, name="every-second")
    return Project(
        name, workers=[worker], schedules=[tick], url=url, modules=["tests.apps.tasks"], signing_key=signing_key
    )


async def forge(project: Project, url: str, body: bytes, message_id: str) -> None:
    """Put `body` in the project's state queue as someone with publish rights could: on RabbitMQ
    with a raw aio-pika publish, on memory:// straight through the transport (unsigned both ways)."""
    transport = project.session.transport
    await transport.declare(state_topology(project.name, transport.server_version))
    queue = state_queue(project.name)
    if url.startswith("memory://"):
        await transport.publish("", queue, Message(body, STATE_TYPE, message_id, "someone", wall_clock()))
        return
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        message = aio_pika.Message(body, delivery_mode=2, message_id=message_id, type=STATE_TYPE)
        await channel.default_exchange.publish(message, queue)
    finally:
        await connection.close()


async def ticking(project: Project, *, ticks: int = 3, timeout: float = 12) -> Scheduler:
    """Run a scheduler of `project` until it has enqueued `ticks` ticks (failing after `timeout`)."""
    scheduler, stop = Scheduler(project), asyncio.Event()
    running = asyncio.create_task(scheduler.run(stop))
    try:
        await eventually(lambda: scheduler.enqueued >= ticks, timeout=timeout)
    finally:
        stop.set()
        await running
    return scheduler


async def saved_state(project: Project) -> dict[str, str]:
    """The ticks of the state the scheduler left (taken, so the queue is empty afterwards)."""
    [message] = await take_messages(project, state_queue(project.name))
    ticks: dict[str, str] = orjson.loads(message.body)["ticks"]
    return ticks


async def assert_on_time(project: Project, scheduler: Scheduler, started: datetime) -> None:
    """The ticks the scheduler enqueued on the worker's queue follow each other second by second
    (2 s apart at most: a step more than a second late on a loaded machine skips one), the first
    within seconds of `started`: the schedule was not held back by what the state said."""
    messages = await take_messages(project, project.name, scheduler.enqueued)
    times = sorted(datetime.fromisoformat(str(m.headers[TICK])) for m in messages)
    assert times[0] - started < timedelta(seconds=3), (started, times)
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert all(timedelta(seconds=1) <= gap <= timedelta(seconds=2) for gap in gaps), times


async def tick_over_forged(project: Project, url: str, body: bytes, message_id: str) -> tuple[datetime, dict[str, str]]:
    """Forge the state, run a scheduler for 3 ticks that must come on time: when it started, and
    the ticks of the state it left."""
    await forge(project, url, body, message_id)
    started = project.session.now()
    scheduler = await ticking(project)
    saved = await saved_state(project)
    await assert_on_time(project, scheduler, started)
    return started, saved


def assert_quiet(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing failed in a step, and every line the scheduler logged is one printable line."""
    assert "step failed" not in caplog.text
    assert "trying again" not in caplog.text
    assert not [r for r in caplog.records if r.exc_info], "no traceback"
    assert all(r.getMessage().isprintable() for r in caplog.records), [r.getMessage() for r in caplog.records]


FORGED = [
    pytest.param({"every-second": "9999-12-31T23:59:59.000Z"}, "in the future", id="year-9999"),
    pytest.param({"every-second": "9999-12-31T23:59:59-23:59"}, "unreadable", id="odd-offset-future"),
    pytest.param({"every-second": "0001-01-01T00:00:00+23:59"}, "unreadable", id="odd-offset-past"),
    pytest.param(
        {"every-second": NOW, "gone": NOW, "also\ngone": "x" * 100_000}, "no schedule of the project has", id="unknown"
    ),
]


@pytest.mark.timeout(40)
@pytest.mark.parametrize(("ticks", "logged"), FORGED)
async def test_a_forged_state_costs_only_its_own_entries(
    url: str, name: str, state: str, ticks: dict[str, object], logged: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nobs_amqp")
    recent = format_time(wall_clock() - timedelta(seconds=3))
    ticks = {key: recent if value == NOW else value for key, value in ticks.items()}
    project = every_second(url, name)
    async with project:
        started, saved = await tick_over_forged(project, url, orjson.dumps({"ticks": ticks}), "forged-state")
    assert list(saved) == ["every-second"], "names no schedule has are dropped"
    last = datetime.fromisoformat(saved["every-second"])
    assert started - timedelta(seconds=4) < last <= datetime.now(UTC), "the last tick saved is a real one"
    assert logged in caplog.text
    assert_quiet(caplog)


@pytest.mark.timeout(40)
async def test_garbage_in_the_state_is_ignored_and_logged_printably(
    url: str, name: str, state: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nobs_amqp")
    project = every_second(url, name)
    async with project:
        _, saved = await tick_over_forged(project, url, b'{"ticks": [\x00\xff', "forged\nscheduler x: active")
    assert list(saved) == ["every-second"]
    assert "ignored state message forged\\nscheduler x: active: unreadable" in caplog.text
    assert_quiet(caplog)


@pytest.mark.timeout(40)
async def test_with_a_signing_key_an_unsigned_state_is_ignored_and_the_new_one_is_signed(
    url: str, name: str, state: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nobs_amqp")
    project = every_second(url, name, signing_key=KEY)
    # An hour old: believed, it would make the scheduler enqueue at once and log the skipped ticks.
    forged = {"every-second": format_time(wall_clock() - timedelta(hours=1))}
    async with project:
        await forge(project, url, orjson.dumps({"ticks": forged}), "unsigned-state")
        started = project.session.now()
        scheduler = await ticking(project, ticks=2)
        [saved] = await take_messages(project, state)
        await assert_on_time(project, scheduler, started)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("ignored state message unsigned-state: the message is not signed" in w for w in warnings), warnings
    assert "skipped the ticks" not in caplog.text, "the forged state was not believed"
    assert "every-second: every 1 s, new, first tick" in caplog.text
    assert Signer.configured(KEY).problem(saved, state) is None  # type: ignore[union-attr]
    assert_quiet(caplog)


@pytest.mark.timeout(30)
async def test_a_signed_state_is_taken_over_and_one_signed_with_another_key_is_not(
    memory: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A scheduler with the same key goes on from the state; one with another key ignores it
    (one warning naming the message) and starts afresh."""
    name = f"signed-{uuid.uuid4().hex[:6]}"
    caplog.set_level(logging.INFO, logger="nobs_amqp")
    first = every_second(memory, name, signing_key=KEY)
    same = every_second(memory, name, signing_key=KEY)
    other = every_second(memory, name, signing_key="another key of at least 16 bytes")
    async with first, same, other:
        clock = first.session.transport
        one = Scheduler(first)
        upcoming = await one.step()
        assert upcoming is not None
        await clock.advance((upcoming - first.session.now()).total_seconds())  # type: ignore[attr-defined]
        await one.step()
        assert one.enqueued == 1
        await one.resign()
        caplog.clear()
        two = Scheduler(same)
        assert await two.step() is not None
        assert two.active
        assert "schedule every-second: every 1 s, last tick" in caplog.text, "went on from the signed state"
        await two.resign()
        caplog.clear()
        three = Scheduler(other)
        assert await three.step() is not None
        assert three.active
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "ignored state message" in warnings[0]
    assert "the signature does not match" in warnings[0]
    assert "schedule every-second: every 1 s, new, first tick" in caplog.text
    assert_quiet(caplog)


@pytest.mark.timeout(30)
async def test_every_kind_of_bad_value_costs_only_its_own_schedule(
    memory: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One state with a bad value for each of five schedules, a good one for the sixth and a name
    no schedule has: the sixth goes on from its tick, the five start afresh, nothing raises."""
    caplog.set_level(logging.INFO, logger="nobs_amqp")
    name = f"values-{uuid.uuid4().hex[:6]}"
    worker = Worker(name)
    names = ["year-9999", "odd-future", "odd-past", "number", "huge", "good"]
    made = [Schedule(tasks.record, tasks.Job(key=f"{name}-{n}"), worker=worker, every=60, name=n) for n in names]
    project = Project(name, workers=[worker], schedules=made, url=memory, modules=["tests.apps.tasks"])
    async with project:
        good = project.session.now() - timedelta(minutes=5)
        ticks = {
            "year-9999": "9999-12-31T23:59:59.999Z",
            "odd-future": "9999-12-31T23:59:59-23:59",
            "odd-past": "0001-01-01T00:00:00+23:59",
            "number": 1e308,
            "huge": "2024-01-01T00:00:00" + " " * 1_000_000,
            "good": format_time(good),
            "gone": format_time(good),
        }
        await forge(project, memory, orjson.dumps({"ticks": ticks}), "forged-state")
        scheduler = Scheduler(project)
        upcoming = await scheduler.step()
        assert upcoming is not None
        assert scheduler.enqueued == 1, "the good one's latest tick, at once"
        await project.session.transport.advance((upcoming - project.session.now()).total_seconds())  # type: ignore[attr-defined]
        await scheduler.step()
        assert scheduler.enqueued == 1 + len(names), "then every schedule, on its next tick"
        saved = await saved_state(project)
    assert sorted(saved) == sorted(names)
    assert "schedule good: every 60 s, last tick" in caplog.text
    for fresh in names[:-1]:
        assert f"schedule {fresh}: every 60 s, new, first tick" in caplog.text
    assert "dropped 1 name(s) no schedule of the project has" in caplog.text
    assert_quiet(caplog)


@pytest.fixture
def memory() -> Iterator[str]:
    url = f"memory://{uuid.uuid4().hex}"
    yield url
    MemoryBroker.forget(url)
