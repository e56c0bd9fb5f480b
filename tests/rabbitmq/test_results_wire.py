"""Results on RabbitMQ only: direct reply-to on the wire, a hostile reply_to, a lost connection."""

from __future__ import annotations

import time

import pytest
from tenacity import stop_after_attempt, wait_none

from nobs_amqp import Project, Worker
from nobs_amqp import message as wire
from nobs_amqp.errors import ResultLostError
from nobs_amqp.testing import drain

from ..apps import results_tasks as t
from ..proxy import Proxy
from ..support import Broker

PROJECT = "nobs-results"


def make(url: str, name: str) -> tuple[Project, Worker]:
    worker = Worker(name, stop=stop_after_attempt(3), wait=wait_none())
    return Project(name=PROJECT, workers=[worker], packages=["tests"], url=url), worker


async def test_a_request_asks_for_a_direct_reply_and_a_plain_task_does_not(
    amqp_url: str, name: str, broker: Broker
) -> None:
    project, worker = make(amqp_url, name)
    async with project:
        plain = await worker.queue(t.add, t.Pair(a=1, b=1))
        asked = await worker.queue(t.add, t.Pair(a=1, b=1), result=True)
    first, second = await broker.take(name, 2)
    assert (first.message_id, second.message_id) == (plain, asked)
    assert first.reply_to is None and wire.REPLY not in (first.headers or {})
    assert second.reply_to is not None and second.reply_to.startswith("amq.rabbitmq.reply-to.")
    assert second.headers[wire.REPLY] == asked


@pytest.mark.parametrize("address", ["victim", "amq.rabbitmq.reply-to.bm90LWEtcmVhbC1hZGRyZXNz"])
async def test_a_forged_reply_to_is_never_written_to(amqp_url: str, name: str, broker: Broker, address: str) -> None:
    """A publisher may set any reply_to: a worker replies to direct reply-to addresses only, never
    to a queue; a forged address costs nothing (the task runs and is acked)."""
    victim = f"{name}-victim"
    project, worker = make(amqp_url, name)
    channel = await broker.channel()
    await channel.declare_queue(victim, auto_delete=False)
    try:
        async with project:
            await project.session.declare(worker, delayed=False)
            reference = "tests.apps.results_tasks:add"
            await broker.publish_raw(
                name,
                b'{"a": 1, "b": 2}',
                message_id="forged",
                type=reference,
                reply_to=victim if address == "victim" else address,
                headers={wire.REPLY: "forged", wire.ATTEMPT: 1},
            )
            assert await drain(project, timeout=20) == 1
            assert await broker.count(f"{name}.dlq") == 0
        assert await broker.count(victim) == 0
    finally:
        await channel.queue_delete(victim)


@pytest.mark.timeout(40)
async def test_a_result_whose_connection_dropped_fails_at_once(amqp_url: str, name: str) -> None:
    async with Proxy() as proxy:
        project, worker = make(proxy.url_for(amqp_url), name)
        async with project:
            handle = await worker.queue(t.add, t.Pair(a=1, b=2), result=True)
            assert proxy.cut() >= 1
            started = time.monotonic()
            with pytest.raises(ResultLostError, match="lost"):
                await handle.result(timeout=30)
            assert time.monotonic() - started < 5
            # The connection is back: a new request gets its result (its consumer is made again).
            again = await worker.queue(t.add, t.Pair(a=2, b=2), result=True)
            await drain(project, timeout=20)
            assert (await again.result(timeout=10)).total == 4
