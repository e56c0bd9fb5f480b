"""Rate limits: the options, the limiter's topology, and the memory broker's sliding window."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from nobs_amqp import ConfigurationError, RateLimit, Worker, task
from nobs_amqp.message import new_message
from nobs_amqp.ratelimit import Permits, Waits, rate_limit, rate_limits
from nobs_amqp.tasks import options_of
from nobs_amqp.topology import (
    QueueOptions,
    rate_limit_queue,
    rate_limit_topology,
    worker_topology,
)
from nobs_amqp.transports.memory import MemoryBroker, MemoryTransport


@pytest.mark.parametrize(
    ("text", "calls", "seconds"), [("10/s", 10, 1.0), ("100/m", 100, 60.0), ("5/h", 5, 3600.0), (" 3 / s ", 3, 1.0)]
)
def test_rate_strings(text: str, calls: int, seconds: float) -> None:
    limit = rate_limit(text, "w", "worker 'w'")
    assert limit is not None
    assert (limit.name, limit.calls, limit.seconds) == ("w", calls, seconds)


@pytest.mark.parametrize("bad", ["10", "10/d", "ten/s", "0/s", "-1/s", "1.5/s", "10/sec", ""])
def test_bad_rate_strings_say_what_to_write(bad: str) -> None:
    expected = r"worker 'w': rate_limit .* is not usable: write 'N/s', 'N/m' or 'N/h'"
    with pytest.raises(ConfigurationError, match=expected):
        Worker("w", rate_limit=bad)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("a b", 1), "rate limit name 'a b' is not usable"),
        (("x", 0), "calls must be a whole number of at least 1"),
        (("x", 1, 0), "per must be 0.01 s to 1 day"),
        (("x", 1, timedelta(days=2)), "per must be 0.01 s to 1 day"),
    ],
)
def test_rate_limits_are_checked(arguments: tuple[object, ...], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RateLimit(*arguments)  # type: ignore[arg-type]


def test_a_shared_limit_is_one_limit() -> None:
    shared = RateLimit("webhook.example", 10, per=timedelta(seconds=1))
    assert shared.seconds == 1.0 and shared.period_ms == 1000
    assert Worker("a", rate_limit=shared).rate_limit is shared
    same = RateLimit("webhook.example", 10)
    assert rate_limits(shared, None, same) == (shared,)  # a task's and its worker's: one permit


def test_a_tasks_own_limit_is_named_after_it() -> None:
    @task(rate_limit="3/s")
    def call_webhook(request: object) -> None: ...

    limit = options_of(call_webhook).rate_limit
    assert limit is not None
    assert (limit.name, limit.calls) == (f"{__name__}.test_a_tasks_own_limit_is_named_after_it.locals.call_webhook", 3)
    assert options_of(call_webhook).describe() == "rate_limit=3/1s"


def test_a_bad_task_limit_fails_at_the_decorator() -> None:
    with pytest.raises(ConfigurationError, match="@task"):
        task(rate_limit="fast")


def test_the_limiters_queue() -> None:
    assert rate_limit_queue("shop", "webhook.example", 10, 1000) == "shop.rate.webhook.example.10-per-1000ms"
    with pytest.raises(ConfigurationError, match="give the limit a shorter name"):
        rate_limit_queue("p" * 200, "n" * 60, 10, 1000)
    [queue] = rate_limit_topology("shop.rate.x.10-per-1000ms", 10, 1000).queues
    assert dict(queue.arguments) == {
        "x-queue-type": "classic",
        "x-max-length": 10,
        "x-overflow": "reject-publish",
        "x-message-ttl": 1000,
        "x-expires": 60_000,
    }
    [hourly] = rate_limit_topology("q", 5, 3_600_000).queues
    assert hourly.arguments["x-expires"] == 3 * 3_600_000


def test_quorum_priorities_need_rabbitmq_4() -> None:
    options = QueueOptions("quorum", 10, 9)
    with pytest.raises(ConfigurationError, match=r"need RabbitMQ 4.0 or newer \(the broker is 3.10.0\)"):
        worker_topology("w", options, (3, 10, 0))
    main = worker_topology("w", options, (4, 0, 5)).queues[0].arguments
    assert "x-max-priority" not in main and main["x-queue-type"] == "quorum"
    classic = worker_topology("w", QueueOptions("classic", None, 9), (3, 10, 0)).queues[0].arguments
    assert classic["x-max-priority"] == 9


async def test_the_memory_window_slides_on_the_virtual_clock() -> None:
    url = "memory://test-ratelimit-window"
    transport = MemoryTransport(url)
    try:
        await transport.declare(rate_limit_topology("r", 2, 1000))
        assert [await transport.take_permit("r") for _ in range(3)] == [True, True, False]
        await transport.advance(0.5)
        assert await transport.take_permit("r") is False
        await transport.advance(0.5)  # the first two expire: two slots again
        assert [await transport.take_permit("r") for _ in range(3)] == [True, True, False]
    finally:
        MemoryBroker.forget(url)


async def test_memory_quorum_queues_have_two_priorities() -> None:
    url = "memory://test-ratelimit-priorities"
    transport = MemoryTransport(url)
    try:
        await transport.declare(worker_topology("q", QueueOptions("quorum", 10, 9), (4, 0, 0)))
        for priority in (0, 4, 5, 1, 9):
            message = new_message(b"{}", "m:f", "p", now=transport.now(), priority=priority)
            await transport.publish("", "q", message)
        assert [m.priority for m in transport.broker.messages("q")] == [5, 9, 0, 4, 1]
    finally:
        MemoryBroker.forget(url)


async def test_a_limiter_queue_that_expired_is_declared_again() -> None:
    """RabbitMQ deletes a limiter's queue nobody declared for `x-expires` (publishing does not count):
    a permit taken then finds no queue, declares it again and goes on."""
    url = "memory://test-ratelimit-expired"
    transport = MemoryTransport(url)
    permits = Permits("p", transport, publish_timeout=5)
    limit = RateLimit("x", 2)
    waits = Waits(lambda limit, count: None)
    message = new_message(b"{}", "m:f", "p", now=transport.now())
    try:
        assert await permits.take([limit], asyncio.Event(), waits.of(message))
        del transport.broker.queues["p.rate.x.2-per-1000ms"]  # expired on the broker
        assert await permits.take([limit], asyncio.Event(), waits.of(message))
        assert len(transport.broker.queues["p.rate.x.2-per-1000ms"].ready) == 1
    finally:
        MemoryBroker.forget(url)
