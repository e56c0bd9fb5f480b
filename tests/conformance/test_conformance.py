"""One conformance suite, run unchanged against RabbitMQ and against `memory://`.

Everything here goes through the public API and the transport seam only, so the
in-memory broker has to behave like the real one for it to pass.
"""

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

from nobs_amqp import ConfigurationError, Project, UnroutableError, Worker
from nobs_amqp import message as wire
from nobs_amqp.consumer import Consumer

from ..apps import tasks
from ..support import eventually, publish_raw_message, take_messages

PROJECT = "nobs-test"


def make(url: str, name: str, **options: Any) -> tuple[Project, Worker]:
    worker = Worker(name, **options)
    return Project(name=PROJECT, workers=[worker], packages=["tests"], url=url), worker


@contextlib.asynccontextmanager
async def consuming(project: Project, worker: Worker, **options: Any) -> AsyncIterator[Consumer]:
    consumer = Consumer(project.session, worker, **options)
    task = asyncio.create_task(consumer.run())
    try:
        ready = asyncio.create_task(consumer.ready.wait())
        await asyncio.wait({task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raises what stopped the consumer
        assert consumer.ready.is_set(), "consumer did not start within 10 s"
        yield consumer
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 30)


def key() -> str:
    return uuid.uuid4().hex


async def test_queue_returns_message_id_and_task_runs(url: str, name: str) -> None:
    project, worker = make(url, name)
    k = key()
    async with project:
        message_id = await worker.queue(tasks.record, tasks.Job(key=k))
        assert len(message_id) == 32
        async with consuming(project, worker):
            await eventually(lambda: tasks.calls(k))
    assert len(tasks.calls(k)) == 1


async def test_message_on_the_queue(url: str, name: str) -> None:
    project, worker = make(url, name)
    async with project:
        message_id = await worker.queue(tasks.record, tasks.Job(key="wire"))
        [message] = await take_messages(project, name)
    assert message.body == b'{"key":"wire","fail_times":0,"sleep":0.0}'
    assert message.message_id == message_id
    assert message.task == "tests.apps.tasks:record"
    assert message.app_id == PROJECT
    assert message.attempt == 1
    assert wire.parse_time(message.headers[wire.ENQUEUED_AT]) is not None


async def test_sync_task_with_dataclass_runs_in_thread_pool(url: str, name: str) -> None:
    project, worker = make(url, name)
    k = key()
    async with project, consuming(project, worker):
        await worker.queue(tasks.record_sync, tasks.SyncJob(key=k, numbers=[1, 2]))
        await eventually(lambda: tasks.calls(k))
    assert tasks.THREADS[k].startswith(f"nobs-{name}")


async def test_retries_follow_the_wait_strategy(url: str, name: str) -> None:
    project, worker = make(url, name, wait=tenacity.wait_fixed(1))
    k = key()
    async with project, consuming(project, worker):
        await worker.queue(tasks.record, tasks.Job(key=k, fail_times=2))
        await eventually(lambda: len(tasks.calls(k)) == 3, timeout=15)
    times = tasks.calls(k)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(1.0 <= gap < 2.5 for gap in gaps), gaps


async def test_max_attempts_dead_letters_with_every_header(url: str, name: str) -> None:
    project, worker = make(url, name, stop=tenacity.stop_after_attempt(2), wait=tenacity.wait_fixed(1))
    k = key()
    async with project, consuming(project, worker):
        message_id = await worker.queue(tasks.always_fail, tasks.Job(key=k))
        [dead] = await take_messages(project, f"{name}.dlq")
        assert await project.session.transport.message_count(name) == 0
    assert len(tasks.calls(k)) == 2
    assert dead.message_id == message_id
    assert dead.task == "tests.apps.tasks:always_fail"
    assert orjson.loads(dead.body) == {"key": k, "fail_times": 0, "sleep": 0.0}
    headers = dead.headers
    assert headers[wire.REASON] == "max_attempts"
    assert headers[wire.ATTEMPT] == 2
    assert headers[wire.ERROR_TYPE] == "builtins.RuntimeError"
    assert headers[wire.ERROR_MESSAGE] == f"boom {k}"
    assert "RuntimeError" in str(headers[wire.TRACEBACK])
    assert "always_fail" in str(headers[wire.TRACEBACK])
    assert "consumer.py" not in str(headers[wire.TRACEBACK])  # the worker's own frames are left out
    assert wire.ETA not in headers
    assert wire.parse_time(headers[wire.FAILED_AT]) is not None
    assert wire.parse_time(headers[wire.ENQUEUED_AT]) is not None
    assert headers[wire.WORKER_HOST]
    assert "x-death" not in headers


async def test_retry_and_reject_from_the_task(url: str, name: str) -> None:
    project, worker = make(url, name)
    retried, rejected = key(), key()
    async with project, consuming(project, worker):
        started = time.time()
        await worker.queue(tasks.ask_retry, tasks.Job(key=retried))
        await worker.queue(tasks.reject, tasks.Job(key=rejected))
        [dead] = await take_messages(project, f"{name}.dlq")
        await eventually(lambda: len(tasks.calls(retried)) == 2, timeout=10)
    assert tasks.calls(retried)[1] - started >= 1.0
    assert len(tasks.calls(rejected)) == 1
    assert dead.headers[wire.REASON] == "rejected"
    assert dead.headers[wire.ERROR_MESSAGE] == "this payload is not for us"
    assert dead.headers[wire.ERROR_TYPE] == "nobs_amqp.retry.Reject"


async def test_time_limit(url: str, name: str) -> None:
    project, worker = make(url, name, time_limit=0.2, stop=tenacity.stop_after_attempt(1))
    k = key()
    async with project, consuming(project, worker):
        await worker.queue(tasks.too_slow, tasks.Job(key=k, sleep=5))
        [dead] = await take_messages(project, f"{name}.dlq")
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
    url: str, name: str, task: str, body: bytes, reason: str
) -> None:
    project, worker = make(url, name)
    k = key()
    async with project, consuming(project, worker):
        await publish_raw_message(project, name, body, task, message_id="bad")
        [dead] = await take_messages(project, f"{name}.dlq")
        await worker.queue(tasks.record, tasks.Job(key=k))
        await eventually(lambda: tasks.calls(k))
    assert dead.headers[wire.REASON] == reason
    assert dead.body == body
    assert dead.message_id == "bad"
    assert "tests_outside_sentinel" not in sys.modules


async def test_delayed_enqueue_runs_on_time(url: str, name: str) -> None:
    project, worker = make(url, name)
    k = key()
    async with project, consuming(project, worker):
        await worker.queue(tasks.record, tasks.Job(key=k), delay=0.1)  # declare the ladder first
        await eventually(lambda: tasks.calls(k))
        k2 = key()
        await worker.queue(tasks.record, tasks.Job(key=k2), delay=2.5)
        queued = time.time()
        [ran] = await eventually(lambda: tasks.calls(k2), timeout=10)
    assert 2.5 <= ran - queued <= 2.5 + 1.0 + 0.5


async def test_priorities(url: str, name: str) -> None:
    project, worker = make(url, name, queue_type="classic", max_priority=5, concurrency=1, prefetch=1)
    keys = [f"{name}-{i}" for i in range(4)]
    async with project:
        for i, k in enumerate(keys):
            await worker.queue(tasks.record, tasks.Job(key=k), priority=i)
        await Consumer(project.session, worker, burst=True).run()
    order = sorted(keys, key=lambda k: tasks.calls(k)[0])
    assert order == list(reversed(keys))


async def test_quorum_priorities_on_rabbitmq_4(url: str, name: str) -> None:
    """RabbitMQ 4 quorum queues have two priorities (0-4 normal, 5 and up high); 3.x none: a clear error."""
    project, worker = make(url, name, max_priority=9, concurrency=1, prefetch=1)
    normal, high = [f"{name}-n{i}" for i in range(4)], [f"{name}-h{i}" for i in range(2)]
    async with project:
        version = project.session.transport.server_version
        if version < (4,):
            shown = rf"{version[0]}\.{version[1]}"
            expected = rf"priorities on a quorum queue need RabbitMQ 4.0 or newer \(the broker is {shown}"
            with pytest.raises(ConfigurationError, match=expected):
                await worker.queue(tasks.record, tasks.Job(key=normal[0]), priority=1)
            with pytest.raises(ConfigurationError, match="queue_type='classic', max_priority=N"):
                await Consumer(project.session, worker, burst=True).run()
            return
        for i, k in enumerate(normal):
            await worker.queue(tasks.record, tasks.Job(key=k), priority=i)  # 0..3: all normal
        for k, priority in zip(high, (5, 9), strict=True):
            await worker.queue(tasks.record, tasks.Job(key=k), priority=priority)
        await Consumer(project.session, worker, burst=True).run()
    order = sorted(normal + high, key=lambda k: tasks.calls(k)[0])
    assert sorted(order[:2]) == high  # the high ones first
    assert order[2:] == normal  # normal ones in the order they came, whatever their priority 0-4


async def test_burst_on_an_empty_queue_returns_at_once(url: str, name: str) -> None:
    project, worker = make(url, name)
    async with project:
        started = time.monotonic()
        consumer = Consumer(project.session, worker, burst=True)
        await asyncio.wait_for(consumer.run(), 10)
    assert consumer.processed == 0
    assert time.monotonic() - started < 5


async def test_unroutable_publish_raises(url: str, name: str) -> None:
    project, _ = make(url, name)
    async with project:
        with pytest.raises(UnroutableError, match="no queue received it"):
            await publish_raw_message(project, f"{name}-missing", b"{}", "tests.apps.tasks:record")


async def test_declaring_twice_is_idempotent(url: str, name: str) -> None:
    for _ in range(2):
        project, worker = make(url, name)
        async with project:
            await project.session.declare(worker, delayed=True)
            await worker.queue(tasks.record, tasks.Job(key="x"), delay=3)
            assert await project.session.transport.message_count(f"{PROJECT}.delay.01") >= 1


async def test_a_message_handed_out_too_often_is_dead_lettered_unrun(url: str, name: str) -> None:
    """Each time its worker died holding it, the queue counted a return; at the limit it is not run again."""
    project, worker = make(url, name, delivery_limit=3)
    k = key()
    async with project:
        await project.session.declare(worker, delayed=False)
        await worker.queue(tasks.record, tasks.Job(key=k))
        for _ in range(3):  # three workers that died holding it: the broker gets it back each time
            held: list[Any] = []

            async def hold(delivery: Any, held: list[Any] = held) -> None:
                held.append(delivery)

            subscription = await project.session.transport.consume(name, 1, hold)
            await eventually(lambda held=held: held)  # type: ignore[misc]
            await subscription.cancel()
            await subscription.close()
        async with consuming(project, worker):
            [dead] = await take_messages(project, f"{name}.dlq")
    assert dead.headers[wire.REASON] == "delivery_limit"
    assert tasks.calls(k) == []


async def test_a_forged_delivery_count_is_not_the_brokers(url: str, name: str) -> None:
    """A publisher's x-delivery-count / x-acquired-count on a first delivery counts for nothing."""
    project, worker = make(url, name, delivery_limit=3)
    k = key()
    async with project, consuming(project, worker):
        body = tasks.Job(key=k).model_dump_json().encode()
        headers = {"x-acquired-count": 100, "x-delivery-count": 100, wire.ATTEMPT: 1}
        await project.session.transport.publish(
            "", name, wire.Message(body, "tests.apps.tasks:record", "forged", PROJECT, wire.wall_clock(), headers)
        )
        await eventually(lambda: tasks.calls(k))
    assert len(tasks.calls(k)) == 1
