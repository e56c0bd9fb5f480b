"""Schedulers handing over: one stops and another goes on (RabbitMQ and memory://), the active
one loses its connection (RabbitMQ, through a TCP proxy), and `nobs-amqp schedule` processes
where the active one is killed with SIGKILL (RabbitMQ)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from nobs_amqp import Project, Schedule, Scheduler, Worker
from nobs_amqp.schedule import SCHEDULE, TICK, tick_id
from nobs_amqp.scheduler import state_queue

from ..apps import tasks
from ..proxy import Proxy
from ..support import ROOT, Broker, eventually, exit_code, output, process, take_messages

#: The most two enqueued ticks of a 1 s schedule may be apart across a handover (1 s, plus
#: up to the second a standby waits between tries, plus slack for a loaded machine).
HANDOVER_GAP = timedelta(seconds=5)


@pytest.fixture
async def state(name: str, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """The project name `name`'s state queue, deleted afterwards on RabbitMQ (the `name` fixture
    deletes the worker's queues)."""
    yield state_queue(name)
    if "rabbitmq" not in request.node.name and "amqp_url" not in request.fixturenames:
        return
    connection = await aio_pika.connect(request.getfixturevalue("vhost_url"))
    try:
        await (await connection.channel()).queue_delete(state_queue(name))
    finally:
        await connection.close()


def every_second(url: str, name: str) -> Project:
    worker = Worker(name)
    tick = Schedule(tasks.record, tasks.Job(key=name), worker=worker, every=1, name="every-second")
    return Project(name, workers=[worker], schedules=[tick], url=url, modules=["tests.apps.tasks"])


def check_ticks(name: str, ticks: list[tuple[str, str]]) -> list[timedelta]:
    """`ticks` (message id, x-nobs-tick) are each once, with their derived ids; the gaps between them."""
    ids = [message_id for message_id, _ in ticks]
    assert len(ids) == len(set(ids)), f"a tick enqueued twice: {sorted(ticks, key=lambda t: t[1])}"
    times = sorted(datetime.fromisoformat(tick) for _, tick in ticks)
    for message_id, tick in ticks:
        assert message_id == tick_id(name, "every-second", datetime.fromisoformat(tick))
    return [later - earlier for earlier, later in itertools.pairwise(times)]


@pytest.mark.timeout(40)
async def test_a_scheduler_that_stops_hands_over_to_one_on_standby(
    url: str, name: str, state: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nobs_amqp")
    first, second = every_second(url, name), every_second(url, name)
    async with first, second:
        one, other = Scheduler(first), Scheduler(second)
        stop_one, stop_other = asyncio.Event(), asyncio.Event()
        running_one = asyncio.create_task(one.run(stop_one))
        running_other = asyncio.create_task(other.run(stop_other))
        try:
            await eventually(lambda: one.enqueued >= 2 or other.enqueued >= 2, timeout=15)
            active, standby, stop = (one, other, stop_one) if one.active else (other, one, stop_other)
            assert not standby.active
            assert "standby (another process is active)" in caplog.text
            stop.set()  # it gives up the lead: the other takes it at its next try
            await eventually(lambda: not active.active and standby.enqueued >= 2, timeout=10)
        finally:
            stop_one.set()
            stop_other.set()
            await asyncio.gather(running_one, running_other)
        assert "stopped, no longer active" in caplog.text
        count = await first.session.transport.message_count(name)
        messages = await take_messages(first, name, count)
        assert await first.session.transport.message_count(state) == 1
    assert count == one.enqueued + other.enqueued
    gaps = check_ticks(name, [(m.message_id, str(m.headers[TICK])) for m in messages])
    assert all(m.headers[SCHEDULE] == "every-second" and m.attempt == 1 for m in messages)
    assert all(timedelta(seconds=1) <= gap <= HANDOVER_GAP for gap in gaps), gaps
    assert sum(gap > timedelta(seconds=1) for gap in gaps) <= 1, f"only the handover may skip a tick: {gaps}"


@pytest.mark.timeout(40)
async def test_an_active_scheduler_that_loses_its_connection_is_replaced_without_a_tick_twice(
    amqp_url: str, name: str, state: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nobs_amqp")
    async with Proxy() as proxy:
        cut, direct = every_second(proxy.url_for(amqp_url), name), every_second(amqp_url, name)
        async with cut:
            one = Scheduler(cut)
            stop = asyncio.Event()
            running_one = asyncio.create_task(one.run(stop))
            await eventually(lambda: one.enqueued >= 1, timeout=15)
            async with direct:
                other = Scheduler(direct)
                running_other = asyncio.create_task(other.run(stop))
                try:
                    await eventually(lambda: "standby (another process is active)" in caplog.text, timeout=10)
                    await asyncio.sleep(1.5 - time.time() % 1)  # half-way between ticks, far from a tick's publishes
                    assert proxy.cut() >= 1
                    # The broker deletes the lost connection's lease: the other takes it, or the first
                    # one again once it has reconnected; either goes on from the state.
                    await eventually(lambda: "reconnected" in caplog.text, timeout=10)
                    enqueued = one.enqueued + other.enqueued
                    await eventually(lambda: one.enqueued + other.enqueued >= enqueued + 2, timeout=10)
                    assert not (one.active and other.active)
                finally:
                    stop.set()
                    await asyncio.gather(running_one, running_other)
                count = await direct.session.transport.message_count(name)
                messages = await take_messages(direct, name, count)
    assert count == one.enqueued + other.enqueued
    gaps = check_ticks(name, [(m.message_id, str(m.headers[TICK])) for m in messages])
    assert all(timedelta(seconds=1) <= gap <= HANDOVER_GAP for gap in gaps), gaps
    assert sum(gap > timedelta(seconds=1) for gap in gaps) <= 1, f"only the handover may skip a tick: {gaps}"


def scheduler_process(amqp_url: str, name: str, log: Path) -> Any:
    env = {"NOBS_AMQP_URL": amqp_url, "NOBS_TEST_WORKER": name, "NOBS_TEST_PROJECT": name, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "nobs_amqp", "--app", "tests.apps.schedules:project", "schedule"]
    return process(command, env=env, log=log)


@pytest.mark.timeout(60)
async def test_kill_9_of_the_active_scheduler_process_hands_over_within_seconds(
    amqp_url: str, name: str, state: str, broker: Broker, tmp_path: Path
) -> None:
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    active_line = f"scheduler {name}: active"
    with scheduler_process(amqp_url, name, logs[0]) as first, scheduler_process(amqp_url, name, logs[1]) as second:
        procs = [first, second]

        def leader() -> int | None:
            return next((i for i, log in enumerate(logs) if active_line in output(log)), None)

        await eventually(lambda: leader() is not None, timeout=20)
        killed = leader()
        assert killed is not None
        survivor = 1 - killed
        await eventually(lambda: "standby" in output(logs[survivor]), timeout=10)
        await eventually(lambda: output(logs[killed]).count("enqueued tick") >= 2, timeout=10)
        await asyncio.sleep(1.5 - time.time() % 1)  # SIGKILL half-way between ticks, far from a tick's publishes
        os.killpg(procs[killed].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        await eventually(lambda: active_line in output(logs[survivor]), timeout=10)
        took_over = time.monotonic() - killed_at
        await eventually(lambda: output(logs[survivor]).count("enqueued tick") >= 2, timeout=10)
        procs[survivor].send_signal(signal.SIGTERM)
        assert await exit_code(procs[survivor], logs[survivor], 15) == 0
    assert took_over < 5, f"took {took_over:.1f} s to take over"
    assert "stopped, no longer active" in output(logs[survivor])
    enqueued = sum(output(log).count("enqueued tick") for log in logs)
    messages = await broker.take(name, n=enqueued, timeout=10)
    assert await broker.count(name) == 0, "every tick enqueued was logged"
    gaps = check_ticks(name, [(m.message_id or "", str((m.headers or {})[TICK])) for m in messages])
    assert all(timedelta(seconds=1) <= gap <= HANDOVER_GAP for gap in gaps), gaps
    assert sum(gap > timedelta(seconds=1) for gap in gaps) <= 1, f"only the handover may skip a tick: {gaps}"
