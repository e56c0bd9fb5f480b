"""End to end on a real broker: queue, consume, retry through the ladder, dead-letter."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import tenacity

from nobs_amqp import Project, Worker
from nobs_amqp import message as wire
from nobs_amqp.consumer import Consumer

from .apps import tasks
from .support import Broker, eventually

PROJECT = "nobs-test"


def make(name: str, **options: Any) -> tuple[Project, Worker]:
    worker = Worker(name, **options)
    return Project(name=PROJECT, workers=[worker], packages=["tests"]), worker


@contextlib.asynccontextmanager
async def consuming(project: Project, worker: Worker, **options: Any) -> AsyncIterator[Consumer]:
    consumer = Consumer(project, worker, **options)
    task = asyncio.create_task(consumer.run())
    try:
        await asyncio.wait_for(consumer.ready.wait(), 10)
        yield consumer
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 30)


def key() -> str:
    return uuid.uuid4().hex


async def test_queue_returns_message_id_and_task_runs(amqp_url: str, name: str) -> None:
    project, worker = make(name)
    k = key()
    async with project:
        message_id = await worker.queue(tasks.record, tasks.Job(key=k))
        assert len(message_id) == 32
        async with consuming(project, worker):
            await eventually(lambda: tasks.calls(k))
    assert len(tasks.calls(k)) == 1


async def test_wire_format(amqp_url: str, name: str, broker: Broker) -> None:
    project, worker = make(name)
    async with project:
        message_id = await worker.queue(tasks.record, tasks.Job(key="wire"))
    [message] = await broker.take(name)
    assert message.body == b'{"key":"wire","fail_times":0,"sleep":0.0}'
    assert message.content_type == "application/json"
    assert message.delivery_mode == 2
    assert message.message_id == message_id
    assert message.type == "tests.apps.tasks:record"
    assert message.app_id == PROJECT
    assert message.timestamp is not None
    assert message.headers[wire.ATTEMPT] == 1
    assert wire.parse_time(message.headers[wire.ENQUEUED_AT]) is not None
    assert wire.ETA not in message.headers


async def test_sync_task_with_dataclass_runs_in_thread_pool(amqp_url: str, name: str) -> None:
    project, worker = make(name)
    k = key()
    async with project, consuming(project, worker):
        await worker.queue(tasks.record_sync, tasks.SyncJob(key=k, numbers=[1, 2]))
        await eventually(lambda: tasks.calls(k))
    assert tasks.THREADS[k].startswith(f"nobs-{name}")


async def test_queue_many(amqp_url: str, name: str, broker: Broker) -> None:
    project, worker = make(name)
    async with project:
        ids = await worker.queue_many(tasks.record, [tasks.Job(key=str(i)) for i in range(50)])
    assert len(set(ids)) == 50
    assert await broker.count(name) == 50


async def test_retries_follow_the_wait_strategy(amqp_url: str, name: str) -> None:
    project, worker = make(name, wait=tenacity.wait_fixed(1))
    k = key()
    async with project, consuming(project, worker):
        await worker.queue(tasks.record, tasks.Job(key=k, fail_times=2))
        await eventually(lambda: len(tasks.calls(k)) == 3, timeout=15)
    times = tasks.calls(k)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(1.0 <= gap < 2.5 for gap in gaps), gaps


async def test_max_attempts_dead_letters_with_every_header(amqp_url: str, name: str, broker: Broker) -> None:
    project, worker = make(name, stop=tenacity.stop_after_attempt(2), wait=tenacity.wait_fixed(1))
    k = key()
    async with project, consuming(project, worker):
        message_id = await worker.queue(tasks.always_fail, tasks.Job(key=k))
        [dead] = await broker.take(f"{name}.dlq", timeout=15)
    assert len(tasks.calls(k)) == 2
    assert dead.message_id == message_id
    assert dead.type == "tests.apps.tasks:always_fail"
    assert orjson.loads(dead.body) == {"key": k, "fail_times": 0, "sleep": 0.0}
    headers = dead.headers
    assert headers[wire.REASON] == "max_attempts"
    assert headers[wire.ATTEMPT] == 2
    assert headers[wire.ERROR_TYPE] == "builtins.RuntimeError"
    assert headers[wire.ERROR_MESSAGE] == f"boom {k}"
    assert "RuntimeError" in str(headers[wire.TRACEBACK])
    assert "always_fail" in str(headers[wire.TRACEBACK])
    assert wire.parse_time(headers[wire.FAILED_AT]) is not None
    assert wire.parse_time(headers[wire.ENQUEUED_AT]) is not None
    assert headers[wire.WORKER_HOST]
    assert "x-death" not in headers
    assert await broker.count(name) == 0


async def test_default_policy_reaches_dlq_within_a_minute(amqp_url: str, name: str) -> None:
    """Five attempts, exponential jittered waits: the state machine, without waiting for it."""
    from nobs_amqp.retry import DeadLetter, RetryLater, RetryPolicy, decide

    policy, started = RetryPolicy(), wire.now()
    waits = []
    for attempt in range(1, 6):
        outcome = decide(policy, RuntimeError("x"), attempt, started)
        if isinstance(outcome, RetryLater):
            waits.append(outcome.delay)
    assert isinstance(outcome, DeadLetter)
    assert len(waits) == 4
    assert 1 <= waits[0] <= 2
    assert all(a < b for a, b in itertools.pairwise(waits))
    assert sum(waits) < 60


async def test_retry_and_reject_from_the_task(amqp_url: str, name: str, broker: Broker) -> None:
    project, worker = make(name)
    retried, rejected = key(), key()
    async with project, consuming(project, worker):
        started = time.time()
        await worker.queue(tasks.ask_retry, tasks.Job(key=retried))
        await worker.queue(tasks.reject, tasks.Job(key=rejected))
        [dead] = await broker.take(f"{name}.dlq")
        await eventually(lambda: len(tasks.calls(retried)) == 2, timeout=10)
    assert tasks.calls(retried)[1] - started >= 1.0
    assert len(tasks.calls(rejected)) == 1
    assert dead.headers[wire.REASON] == "rejected"
    assert dead.headers[wire.ERROR_MESSAGE] == "this payload is not for us"
    assert dead.headers[wire.ERROR_TYPE] == "nobs_amqp.retry.Reject"


async def test_time_limit(amqp_url: str, name: str, broker: Broker) -> None:
    project, worker = make(name, time_limit=0.2, stop=tenacity.stop_after_attempt(1))
    k = key()
    async with project, consuming(project, worker):
        await worker.queue(tasks.too_slow, tasks.Job(key=k, sleep=5))
        [dead] = await broker.take(f"{name}.dlq")
    assert dead.headers[wire.REASON] == "time_limit"
    assert "time limit of 0.2 s" in str(dead.headers[wire.ERROR_MESSAGE])


@pytest.mark.parametrize(
    ("task", "body", "reason"),
    [
        ("tests.apps.tasks:record", b'{"key": 12}', "validation_error"),
        ("tests.apps.tasks:record", b"\xff not json", "decode_error"),
        ("tests.apps.tasks:no_such_task", b'{"key": "x"}', "unknown_task"),
        ("tests.apps.tasks:NOT_A_FUNCTION", b'{"key": "x"}', "unknown_task"),
        ("tests.apps.tasks:join", b'"x"', "unknown_task"),
        ("os:system", b'"touch /tmp/nobs-pwned"', "unknown_task"),
        ("tests_outside_sentinel:run", b"{}", "unknown_task"),
        ("tests.apps.tasks:record\nos:system", b"{}", "unknown_task"),
        ("", b"{}", "unknown_task"),
    ],
)
async def test_bad_messages_are_dead_lettered_at_once_and_the_worker_goes_on(
    amqp_url: str, name: str, broker: Broker, task: str, body: bytes, reason: str
) -> None:
    project, worker = make(name)
    k = key()
    async with project, consuming(project, worker):
        await broker.publish_raw(name, body, type=task, message_id="bad")
        [dead] = await broker.take(f"{name}.dlq")
        await worker.queue(tasks.record, tasks.Job(key=k))
        await eventually(lambda: tasks.calls(k))
    assert dead.headers[wire.REASON] == reason
    assert dead.body == body
    assert dead.message_id == "bad"
    assert "tests_outside_sentinel" not in sys.modules


async def test_delayed_enqueue_runs_on_time(amqp_url: str, name: str) -> None:
    project, worker = make(name)
    k = key()
    async with project, consuming(project, worker):
        await worker.queue(tasks.record, tasks.Job(key=k), delay=0.1)  # declare the ladder first
        await eventually(lambda: tasks.calls(k))
        k2 = key()
        await worker.queue(tasks.record, tasks.Job(key=k2), delay=2.5)
        queued = time.time()
        [ran] = await eventually(lambda: tasks.calls(k2), timeout=10)
    assert 2.5 <= ran - queued <= 2.5 + 1.0 + 0.5


async def test_declaring_twice_is_idempotent(amqp_url: str, name: str) -> None:
    for _ in range(2):
        project, worker = make(name)
        async with project:
            await project.declare(worker, delayed=True)
            await worker.queue(tasks.record, tasks.Job(key="x"), delay=3)
