"""One time model: the broker side's clock feeds the retry policy and every message's times,
a delay is rounded to the ladder's whole seconds once, and `drain` keeps its own deadline.

Broker-neutral tests run on RabbitMQ (real time) and on memory:// (a virtual clock), unchanged.
"""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import pytest
import tenacity

from nobs_amqp import ConfigurationError, Project, Retry, Worker
from nobs_amqp import message as wire
from nobs_amqp.ladder import MAX_DELAY_SECONDS
from nobs_amqp.testing import drain
from nobs_amqp.transports.memory import MemoryBroker
from nobs_amqp.urls import memory_url

from ..apps import tasks
from ..support import eventually, take_messages

PROJECT = "nobs-test"


def make(url: str, name: str, **options: object) -> tuple[Project, Worker]:
    worker = Worker(name, **options)  # type: ignore[arg-type]
    return Project(name=PROJECT, workers=[worker], packages=["tests"], url=url), worker


def key() -> str:
    return uuid.uuid4().hex


async def test_stop_after_delay_counts_the_brokers_time(url: str, name: str) -> None:
    """Bug: the policy measured elapsed time on the wall clock while memory:// moved a virtual
    one, so `stop_after_delay` never stopped there (thousands of attempts, no dead letter)."""
    project, worker = make(url, name, stop=tenacity.stop_after_delay(3), wait=tenacity.wait_fixed(1))
    k = key()
    async with project:
        await worker.queue(tasks.always_fail, tasks.Job(key=k))
        await drain(project, timeout=30)
        [dead] = await take_messages(project, f"{name}.dlq")
    # attempts at about 0, 1, 2, 3 s (each retry waits its whole second in the ladder)
    assert 3 <= len(tasks.calls(k)) <= 5, len(tasks.calls(k))
    assert dead.headers[wire.REASON] == "max_attempts"


async def test_the_issues_policy_dead_letters_after_ten_virtual_minutes() -> None:
    """`stop_after_delay(600)` with `wait_fixed(30)` on memory://: 21 attempts in no real time."""
    url = memory_url(key())
    project, worker = make(url, "w", stop=tenacity.stop_after_delay(600), wait=tenacity.wait_fixed(30))
    k = key()
    started = time.monotonic()
    try:
        async with project:
            await worker.queue(tasks.always_fail, tasks.Job(key=k))
            await drain(project, timeout=10)
            [dead] = await take_messages(project, "w.dlq")
    finally:
        MemoryBroker.forget(url)
    assert len(tasks.calls(k)) == 21
    assert dead.headers[wire.REASON] == "max_attempts"
    failed_at = wire.parse_time(dead.headers[wire.FAILED_AT])
    enqueued_at = wire.parse_time(dead.headers[wire.ENQUEUED_AT])
    assert failed_at is not None and enqueued_at is not None
    assert timedelta(seconds=600) <= failed_at - enqueued_at < timedelta(seconds=601)  # the virtual clock
    assert time.monotonic() - started < 5


async def test_drain_keeps_its_deadline_on_every_broker(url: str, name: str) -> None:
    """Bug: on memory:// drain checked its deadline only on the RabbitMQ branch, and ended
    with asyncio's TimeoutError from an outer wait_for, if at all."""
    project, worker = make(url, name, stop=tenacity.stop_never, wait=tenacity.wait_fixed(30))
    k = key()
    async with project:
        await worker.queue(tasks.always_fail, tasks.Job(key=k))
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"after 1\.0 s"):
            await drain(project, timeout=1.0)
        elapsed = time.monotonic() - started
    assert elapsed < 5, elapsed
    assert tasks.calls(k)


async def test_a_delay_is_rounded_once_for_the_eta_and_the_ladder(url: str, name: str) -> None:
    """Bug: `queue(delay=0.1)` wrote an ETA 0.1 s after enqueue while the ladder held it 1 s."""
    project, worker = make(url, name)
    async with project:
        queued = time.monotonic()
        await worker.queue(tasks.record, tasks.Job(key=key()), delay=0.1)
        await worker.queue(tasks.record, tasks.Job(key=key()), delay=timedelta(milliseconds=1500))
        first, second = await take_messages(project, name, 2, timeout=15)
        arrived = time.monotonic() - queued
    etas = []
    for message in (first, second):
        eta = wire.parse_time(message.headers[wire.ETA])
        assert eta is not None
        etas.append((eta - message.enqueued_at).total_seconds())
    assert etas == [1.0, 2.0]
    assert arrived >= 1.9  # the ladder held the second one its whole 2 s


async def test_message_times_come_from_the_transports_clock() -> None:
    """On memory:// an hour advanced is an hour later in every header the worker writes."""
    url = memory_url(key())
    project, worker = make(url, "w", stop=tenacity.stop_after_attempt(1))
    k = key()
    try:
        async with project:
            broker = MemoryBroker.named(url)
            await broker.advance(3600)
            await worker.queue(tasks.always_fail, tasks.Job(key=k), delay=5)
            await drain(project, timeout=10)
            [dead] = await take_messages(project, "w.dlq")
    finally:
        MemoryBroker.forget(url)
    ahead = timedelta(seconds=3600)
    now = wire.wall_clock()
    enqueued_at = wire.parse_time(dead.headers[wire.ENQUEUED_AT])
    failed_at = wire.parse_time(dead.headers[wire.FAILED_AT])
    assert enqueued_at is not None and failed_at is not None
    assert now + ahead - timedelta(seconds=60) < enqueued_at < now + ahead
    assert failed_at - enqueued_at >= timedelta(seconds=5)


@pytest.mark.parametrize("delay", [-1, 2**28, float("nan"), float("inf"), "5", True])
async def test_invalid_delays_raise_the_projects_own_error(delay: object) -> None:
    url = memory_url(key())
    project, worker = make(url, "w")
    try:
        async with project:
            with pytest.raises(ConfigurationError, match="delay must be"):
                await worker.queue(tasks.record, tasks.Job(key="x"), delay=delay)  # type: ignore[arg-type]
    finally:
        MemoryBroker.forget(url)
    with pytest.raises(ConfigurationError):
        Retry(delay=delay)  # type: ignore[arg-type]
    assert Retry(delay=MAX_DELAY_SECONDS).delay == MAX_DELAY_SECONDS


async def test_a_time_whose_offset_leaves_the_calendar_is_unreadable_not_an_overflow(url: str, name: str) -> None:
    """Bug: `parse_time` kept odd UTC offsets, so `9999-12-31T23:59:59-23:59` (year 10000 in UTC)
    overflowed wherever it was used later: as a message's enqueue time, the worker's handling of
    the delivery raised `OverflowError` before settling it ("Task exception was never
    retrieved"), and the message came back until the delivery limit dead-lettered it, never run;
    in the scheduler's state, it stopped the scheduler (tests/conformance/test_scheduler_state.py)."""
    project, worker = make(url, name)
    k = key()
    async with project:
        headers = {wire.ATTEMPT: 1, wire.ENQUEUED_AT: "9999-12-31T23:59:59-23:59"}
        body = b'{"key": "%s"}' % k.encode()
        message = wire.Message(body, "tests.apps.tasks:record", k, "someone", wire.wall_clock(), headers)
        async with project.consuming(worker) as [consumer]:
            await project.session.transport.publish("", name, message)
            await eventually(lambda: consumer.processed >= 1, timeout=15)
        assert await project.session.transport.message_count(name) == 0
        assert await project.session.transport.message_count(f"{name}.dlq") == 0
    assert len(tasks.calls(k)) == 1, "it ran, once"
    for value in ("9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59"):
        assert wire.parse_time(value) is None
    assert wire.parse_time("2024-05-01T12:00:00+02:00") == wire.parse_time("2024-05-01T10:00:00Z")
    assert wire.parse_time("9999-12-31T23:59:59Z") is not None
