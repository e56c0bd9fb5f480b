"""The rate limiter's queue on RabbitMQ: a refusal (basic.nack of reject-publish) is an answer,
never sent again; a queue the broker deleted (`x-expires`) is declared again."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

from nobs_amqp import Project, RateLimit
from nobs_amqp.message import new_message
from nobs_amqp.ratelimit import Waits
from nobs_amqp.topology import rate_limit_queue, rate_limit_topology

from ..support import Broker


async def test_a_full_window_is_refused_at_once_and_not_sent_again(amqp_url: str, broker: Broker, name: str) -> None:
    queue = rate_limit_queue("nobs-test", name, 3, 60_000)
    async with Project(name="nobs-test", workers=[], url=amqp_url) as project:
        transport = project.session.transport
        await transport.declare(rate_limit_topology(queue, 3, 60_000))
        assert [await transport.take_permit(queue) for _ in range(3)] == [True, True, True]
        started = time.monotonic()
        assert await transport.take_permit(queue) is False
        assert time.monotonic() - started < 1  # the nack is the answer: no retry until publish_timeout
        assert await broker.count(queue) == 3
    channel = await broker.channel()
    await channel.queue_delete(queue)


async def test_a_limiter_queue_the_broker_deleted_is_declared_again(amqp_url: str, broker: Broker, name: str) -> None:
    limit = RateLimit(name, 2)
    queue = rate_limit_queue("nobs-test", name, 2, 1000)
    message = new_message(b"{}", "m:f", "nobs-test", now=datetime.now(UTC))
    waits = Waits(lambda limit, count: None)
    async with Project(name="nobs-test", workers=[], url=amqp_url) as project:
        permits = project.session.permits
        assert await permits.take([limit], asyncio.Event(), waits.of(message))
        channel = await broker.channel()
        await channel.queue_delete(queue)  # as x-expires does, publishing does not keep it
        assert await permits.take([limit], asyncio.Event(), waits.of(message))
        assert await broker.count(queue) == 1
        await channel.queue_delete(queue)
