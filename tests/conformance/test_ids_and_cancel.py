"""Caller-chosen ids, unique enqueue, expiry and cancellation (issue 19, items 1 and 5), on
RabbitMQ and on `memory://` alike."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import pytest

from nobs_amqp import ConfigurationError, Project, Worker, was_queued
from nobs_amqp import message as wire
from nobs_amqp.transports.base import VirtualClock

from ..apps import tasks
from ..support import eventually, publish_raw_message, take_messages
from .test_conformance import consuming

PROJECT = "nobs-test"


def make(url: str, name: str, **options: Any) -> tuple[Project, Worker]:
    signing_key = options.pop("signing_key", None)
    worker = Worker(name, **options)
    project = Project(name=PROJECT, workers=[worker], packages=["tests"], url=url, signing_key=signing_key)
    return project, worker


def key() -> str:
    return uuid.uuid4().hex


async def pass_time(project: Project, seconds: float) -> None:
    """Let `seconds` go by on the broker's clock: moved on memory://, waited for on RabbitMQ."""
    transport = project.session.transport
    if isinstance(transport, VirtualClock):
        await transport.advance(seconds)
        return
    until = transport.now() + timedelta(seconds=seconds)
    await eventually(lambda: transport.now() >= until, timeout=seconds + 5)


# -- caller-chosen ids and unique enqueue ------------------------------------------------


async def test_a_caller_chosen_id_is_the_message_id(url: str, name: str) -> None:
    project, worker = make(url, name)
    async with project:
        returned = await worker.queue(tasks.record, tasks.Job(key=key()), message_id="order-7/email")
        [message] = await take_messages(project, name)
    assert returned == "order-7/email" and was_queued(returned)
    assert message.message_id == "order-7/email"


@pytest.mark.parametrize("bad", ["", "a\nb", "x" * 201, "é" * 130, 7])
async def test_a_bad_message_id_fails_at_the_call_site(url: str, name: str, bad: Any) -> None:
    project, worker = make(url, name)
    async with project:
        await project.session.declare(worker, delayed=False)
        with pytest.raises(ConfigurationError, match="message_id must be"):
            await worker.queue(tasks.record, tasks.Job(key=key()), message_id=bad)
        assert await project.session.transport.message_count(name) == 0


async def test_unique_queues_an_id_once_within_its_window_across_connections(url: str, name: str) -> None:
    """Two producers (two connections, as two processes would have): the second `queue()` of the
    same id within the window is not sent; another id is."""
    first, worker = make(url, name)
    second, twin = make(url, name)
    job = tasks.Job(key=key())
    async with first, second:
        sent = await worker.queue(tasks.record, job, message_id=f"welcome-{name}", unique=60)
        again = await twin.queue(tasks.record, job, message_id=f"welcome-{name}", unique=timedelta(minutes=1))
        other = await twin.queue(tasks.record, job, message_id=f"welcome-other-{name}", unique=60)
        assert (was_queued(sent), was_queued(again), was_queued(other)) == (True, False, True)
        assert again == f"welcome-{name}"
        assert await first.session.transport.message_count(name) == 2
        async with consuming(first, worker):
            await eventually(lambda: len(tasks.calls(job.key)) == 2)


async def test_unique_lets_the_id_through_again_after_its_window(url: str, name: str) -> None:
    project, worker = make(url, name)
    async with project:
        assert was_queued(await worker.queue(tasks.record, tasks.Job(key=key()), message_id=name, unique=1))
        assert not was_queued(await worker.queue(tasks.record, tasks.Job(key=key()), message_id=name, unique=1))
        await pass_time(project, 1.2)
        assert was_queued(await worker.queue(tasks.record, tasks.Job(key=key()), message_id=name, unique=1))
        assert await project.session.transport.message_count(name) == 2


async def test_unique_needs_a_message_id(url: str, name: str) -> None:
    project, worker = make(url, name)
    async with project:
        with pytest.raises(ConfigurationError, match="unique= needs message_id="):
            await worker.queue(tasks.record, tasks.Job(key=key()), unique=60)


async def test_a_unique_task_that_was_not_sent_gives_its_claim_back(
    url: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The send after the claim fails: the caller may queue the same id again at once."""
    project, worker = make(url, name)
    async with project:
        session = project.session

        async def broken_send(*args: Any, **kwargs: Any) -> None:
            raise ConnectionError("the send failed")

        with monkeypatch.context() as patched:
            patched.setattr(session, "send", broken_send)
            with pytest.raises(ConnectionError):
                await worker.queue(tasks.record, tasks.Job(key=key()), message_id=name, unique=60)
        assert was_queued(await worker.queue(tasks.record, tasks.Job(key=key()), message_id=name, unique=60))
        assert await session.transport.message_count(name) == 1


# -- expiry --------------------------------------------------------------------------------


async def test_an_expired_task_is_dead_lettered_with_its_own_reason(url: str, name: str) -> None:
    project, worker = make(url, name)
    stale, fresh = tasks.Job(key=key()), tasks.Job(key=key())
    async with project:
        stale_id = await worker.queue(tasks.record, stale, expires=1)
        await worker.queue(tasks.record, fresh, expires=timedelta(hours=1))
        await pass_time(project, 1.5)
        async with consuming(project, worker):
            await eventually(lambda: tasks.calls(fresh.key))
            [dead] = await take_messages(project, f"{name}.dlq")
    assert tasks.calls(stale.key) == []
    assert dead.message_id == stale_id
    assert dead.headers[wire.REASON] == "expired"
    assert "expired at" in str(dead.headers[wire.ERROR_MESSAGE])
    assert wire.EXPIRES in dead.headers


async def test_an_unreadable_expiry_from_a_publisher_is_dead_lettered_not_run(url: str, name: str) -> None:
    """A value that cannot be read never makes a task run late: `expired` at once."""
    from nobs_amqp.message import Message, wall_clock

    project, worker = make(url, name)
    job = tasks.Job(key=key())
    async with project:
        await project.session.declare(worker, delayed=False)
        for value in ("soon", 5, "9999-99-99"):
            headers = {wire.EXPIRES: value}
            message = Message(
                job.model_dump_json().encode(), "tests.apps.tasks:record", key(), PROJECT, wall_clock(), headers
            )
            await project.session.transport.publish("", name, message)
        async with consuming(project, worker):
            dead = await take_messages(project, f"{name}.dlq", n=3, timeout=15)
    assert [m.headers[wire.REASON] for m in dead] == ["expired"] * 3
    assert tasks.calls(job.key) == []


async def test_expires_must_be_longer_than_the_delay(url: str, name: str) -> None:
    project, worker = make(url, name)
    async with project:
        with pytest.raises(ConfigurationError, match="must be longer than the delay"):
            await worker.queue(tasks.record, tasks.Job(key=key()), delay=60, expires=30)
        with pytest.raises(ConfigurationError, match="expires must be"):
            await worker.queue(tasks.record, tasks.Job(key=key()), expires=-1)


async def test_an_expiry_travels_with_a_retry(url: str, name: str) -> None:
    """A task that fails and is retried after its expiry is dead-lettered, not run again."""
    project, worker = make(url, name, wait=lambda state: 3.0)
    job = tasks.Job(key=key(), fail_times=5)
    async with project:
        await worker.queue(tasks.record, job, expires=2)
        async with consuming(project, worker):
            await eventually(lambda: tasks.calls(job.key))
            await pass_time(project, 3.5)
            [dead] = await take_messages(project, f"{name}.dlq", timeout=15)
    assert len(tasks.calls(job.key)) == 1
    assert dead.headers[wire.REASON] == "expired"
    assert dead.headers[wire.ATTEMPT] == 2


# -- cancellation --------------------------------------------------------------------------


async def test_cancel_a_queued_and_a_delayed_task(url: str, name: str) -> None:
    project, worker = make(url, name, cancellable=True)
    kept, queued, delayed = tasks.Job(key=key()), tasks.Job(key=key()), tasks.Job(key=key())
    async with project:
        await worker.queue(tasks.record, kept)
        queued_id = await worker.queue(tasks.record, queued)
        delayed_id = await worker.queue(tasks.record, delayed, delay=1, message_id=f"later-{name}")
        await worker.cancel(queued_id)
        await worker.cancel(delayed_id)
        async with consuming(project, worker):
            await eventually(lambda: tasks.calls(kept.key))
            await pass_time(project, 1.5)
            dead = await take_messages(project, f"{name}.dlq", n=2, timeout=15)
    assert tasks.calls(queued.key) == [] and tasks.calls(delayed.key) == []
    assert sorted(m.message_id for m in dead) == sorted([queued_id, delayed_id])
    assert {m.headers[wire.REASON] for m in dead} == {"cancelled"}


async def test_a_running_worker_sees_a_cancellation_made_after_it_started(url: str, name: str) -> None:
    project, worker = make(url, name, cancellable=True)
    job = tasks.Job(key=key())
    async with project, consuming(project, worker):
        message_id = await worker.queue(tasks.record, job, delay=1)
        await worker.cancel(message_id)
        await pass_time(project, 1.5)
        [dead] = await take_messages(project, f"{name}.dlq", timeout=15)
    assert dead.headers[wire.REASON] == "cancelled"
    assert tasks.calls(job.key) == []


async def test_cancel_needs_a_cancellable_worker(url: str, name: str) -> None:
    project, worker = make(url, name)
    async with project:
        with pytest.raises(ConfigurationError, match="cancellable=True"):
            await worker.cancel("anything")


async def test_a_forged_cancellation_is_ignored_when_the_project_signs(url: str, name: str) -> None:
    """Only a signed cancellation counts: an unsigned one written into the stream cancels nothing."""
    project, worker = make(url, name, cancellable=True, signing_key=b"k" * 32)
    job = tasks.Job(key=key())
    async with project:
        message_id = await worker.queue(tasks.record, job)
        await publish_raw_message(project, f"{name}.cancelled", b"{}", "nobs.cancel", message_id=message_id)
        async with consuming(project, worker) as consumer:
            await eventually(lambda: tasks.calls(job.key))
            assert consumer._admission is not None
        signed = await worker.queue(tasks.record, tasks.Job(key=key()))
        await worker.cancel(signed)
        async with consuming(project, worker):
            [dead] = await take_messages(project, f"{name}.dlq", timeout=15)
    assert dead.message_id == signed and dead.headers[wire.REASON] == "cancelled"


async def test_a_starting_worker_reads_every_earlier_cancellation_before_it_takes_a_message(
    url: str, name: str
) -> None:
    """Many cancellations in the stream: by the time a consumer is ready it has read them all."""
    project, worker = make(url, name, cancellable=True)
    ids = [f"{name}-{i}" for i in range(1500)]
    async with project:
        for start in range(0, len(ids), 100):
            await asyncio.gather(*(worker.cancel(i) for i in ids[start : start + 100]))
        last = await worker.queue(tasks.record, tasks.Job(key=key()), message_id=ids[-1])
        async with consuming(project, worker) as consumer:
            assert consumer.cancellations is not None and len(consumer.cancellations) == len(ids)
            [dead] = await take_messages(project, f"{name}.dlq", timeout=15)
    assert dead.message_id == last and dead.headers[wire.REASON] == "cancelled"


async def test_a_duplicate_has_no_result_and_an_awaited_id_must_be_able_to_carry_one(url: str, name: str) -> None:
    from nobs_amqp import ResultNotRequestedError

    project, worker = make(url, name)
    async with project:
        first = await worker.queue(tasks.record, tasks.Job(key=key()), message_id=name, unique=60, result=True)
        again = await worker.queue(tasks.record, tasks.Job(key=key()), message_id=name, unique=60, result=True)
        assert not first.duplicate and again.duplicate and again == first
        with pytest.raises(ResultNotRequestedError, match="was not queued"):
            await again.result(timeout=1)
        with pytest.raises(ConfigurationError, match="cannot carry a result"):
            await worker.queue(tasks.record, tasks.Job(key=key()), message_id="with space", result=True)
        async with consuming(project, worker):
            assert await first.result(timeout=15) is None


def test_the_sync_producer_takes_ids_expiry_and_unique(url: str, name: str) -> None:
    project, worker = make(url, name)
    with project.sync() as producer:
        sent = producer.queue(worker, tasks.record, tasks.Job(key=key()), message_id=name, unique=60, expires=600)
        again = producer.queue(worker, tasks.record, tasks.Job(key=key()), message_id=name, unique=60)
        assert sent == name and was_queued(sent) and not was_queued(again)
        with pytest.raises(ConfigurationError, match="unique= needs message_id="):
            producer.queue(worker, tasks.record, tasks.Job(key=key()), unique=60)
