"""What only RabbitMQ shows: AMQP properties on the wire, and the retry policy's arithmetic."""

from __future__ import annotations

import itertools
from typing import Any

from nobs_amqp import Project, Worker
from nobs_amqp import message as wire

from ..apps import tasks
from ..support import Broker

PROJECT = "nobs-test"


def make(name: str, **options: Any) -> tuple[Project, Worker]:
    worker = Worker(name, **options)
    return Project(name=PROJECT, workers=[worker], packages=["tests"]), worker


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


async def test_queue_many(amqp_url: str, name: str, broker: Broker) -> None:
    project, worker = make(name)
    async with project:
        ids = await worker.queue_many(tasks.record, [tasks.Job(key=str(i)) for i in range(50)])
    assert len(set(ids)) == 50
    assert await broker.count(name) == 50


async def test_default_policy_reaches_dlq_within_a_minute() -> None:
    """Five attempts, exponential jittered waits: the state machine, without waiting for it."""
    from nobs_amqp.outcome import DeadLetter, Raised, RetryLater, decide
    from nobs_amqp.retry import RetryPolicy

    policy, started = RetryPolicy(), wire.wall_clock()
    waits = []
    for attempt in range(1, 6):
        outcome = decide(Raised(RuntimeError("x"), attempt, started), policy, started)
        if isinstance(outcome, RetryLater):
            waits.append(outcome.delay)
    assert isinstance(outcome, DeadLetter)
    assert len(waits) == 4
    assert 1 <= waits[0] <= 2
    assert all(a < b for a, b in itertools.pairwise(waits))
    assert sum(waits) < 60


async def test_batched_acks_run_every_task_exactly_once_without_faults(amqp_url: str, name: str) -> None:
    """Out-of-order completion under a backlog: the batched acks must never confuse the broker
    (an ack for a tag a multiple ack already covered closes the channel, and everything
    unacked on it runs again)."""
    from nobs_amqp.testing import drain

    project, worker = make(name, concurrency=20)
    keys = [f"{name}-{i}" for i in range(2000)]
    async with project:
        await worker.queue_many(tasks.record, [tasks.Job(key=k, sleep=(i % 7) / 1000) for i, k in enumerate(keys)])
        assert await drain(project, timeout=60) == len(keys)
    assert [k for k in keys if len(tasks.calls(k)) != 1] == []
