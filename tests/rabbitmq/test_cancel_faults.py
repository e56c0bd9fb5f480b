"""Cancellation and unique enqueue under faults on a real broker (behind a TCP proxy that can
cut connections; the shared broker is never touched)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from nobs_amqp import BrokerUnavailableError, Project, Worker, was_queued
from nobs_amqp import message as wire
from nobs_amqp.consumer import Consumer

from ..apps import tasks
from ..proxy import Proxy
from ..support import eventually, take_messages

PROJECT = "nobs-test"


def make(name: str, *, url: str, **options: Any) -> tuple[Project, Worker]:
    worker = Worker(name, **options)
    return Project(name=PROJECT, workers=[worker], url=url, packages=["tests"]), worker


@pytest.mark.timeout(90)
async def test_a_cancellation_made_while_the_worker_reconnects_holds(amqp_url: str, name: str) -> None:
    """The worker's connection is cut; while it reconnects, a task is queued and cancelled from
    another connection. The worker reads the stream again before it runs anything: not run."""
    job, after = tasks.Job(key=uuid.uuid4().hex), tasks.Job(key=uuid.uuid4().hex)
    async with Proxy() as proxy:
        project, worker = make(name, url=proxy.url_for(amqp_url), cancellable=True)
        producer, direct = make(name, url=amqp_url, cancellable=True)
        async with project, producer:
            consumer = Consumer(project.session, worker)
            running = asyncio.create_task(consumer.run())
            try:
                await asyncio.wait_for(consumer.ready.wait(), 15)
                proxy.refusing = True
                assert proxy.cut() >= 1
                message_id = await direct.queue(tasks.record, job)
                await direct.cancel(message_id)
                await direct.queue(tasks.record, after)
                await eventually(lambda: proxy.refused >= 1, timeout=15)
                proxy.refusing = False
                await eventually(lambda: tasks.calls(after.key), timeout=30)
                [dead] = await take_messages(producer, f"{name}.dlq", timeout=15)
            finally:
                consumer.stop()
                await asyncio.wait_for(running, 15)
    assert tasks.calls(job.key) == []
    assert dead.message_id == message_id and dead.headers[wire.REASON] == "cancelled"


@pytest.mark.timeout(60)
async def test_unique_fails_clearly_while_the_broker_is_unreachable(amqp_url: str, name: str) -> None:
    """No broker for the whole publish timeout: a typed error that says what it means for the claim."""
    async with Proxy() as proxy:
        worker = Worker(name)
        project = Project(
            name=PROJECT, workers=[worker], url=proxy.url_for(amqp_url), packages=["tests"], publish_timeout=2
        )
        async with project:
            await project.session.declare(worker, delayed=False)
            proxy.refusing = True
            proxy.cut()
            with pytest.raises(BrokerUnavailableError) as caught:
                await worker.queue(tasks.record, tasks.Job(key="x"), message_id=name, unique=60)
            proxy.refusing = False
            assert "claim" in str(caught.value) or "unreachable" in str(caught.value)
            # Once the broker is back, the same id can be queued: nothing was claimed.
            queued = await worker.queue(tasks.record, tasks.Job(key="x"), message_id=name, unique=60)
            assert was_queued(queued)
