"""Rate limits hold across consumers of separate connections (as across processes), on RabbitMQ
and on memory://: no window of one period holds more starts than the limit, and a task that
waits for its turn neither fails nor costs an attempt."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from prometheus_client import CollectorRegistry

from nobs_amqp import BrokerUnavailableError, Observer, Project, RateLimit, Worker
from nobs_amqp import consumer as consumer_module
from nobs_amqp import message as wire
from nobs_amqp.consumer import Consumer
from nobs_amqp.observe.metrics import PrometheusMetrics
from nobs_amqp.tasks import OPTIONS_ATTRIBUTE
from nobs_amqp.testing import drain
from nobs_amqp.transports.base import Delivery, VirtualClock

from ..apps import rate_tasks
from ..apps.tasks import Job
from ..support import eventually

PROJECT = "nobs-test"
#: A start is stamped when the task runs, a little after the broker granted its permit: two
#: permits one period apart may be stamped a few milliseconds closer than that.
CLOCK_SLACK = 0.05


@contextlib.asynccontextmanager
async def consuming(project: Project, worker: Worker, **options: object) -> AsyncIterator[Consumer]:
    consumer = Consumer(project.session, worker, **options)  # type: ignore[arg-type]
    run = asyncio.create_task(consumer.run())
    ready = asyncio.create_task(consumer.ready.wait())
    await asyncio.wait({run, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if run.done():
        run.result()
    try:
        yield consumer
    finally:
        consumer.stop()
        await asyncio.wait_for(run, 30)


def two_projects(url: str, name: str, **options: object) -> tuple[list[Project], list[Worker]]:
    """Two projects of one name on separate connections, each with a worker of `name`: two
    worker processes of one deployment."""
    workers = [Worker(name, concurrency=10, **options) for _ in range(2)]  # type: ignore[arg-type]
    return [Project(name=PROJECT, workers=[w], packages=["tests"], url=url) for w in workers], workers


@pytest.mark.timeout(40)
async def test_a_shared_limit_holds_across_two_connections(url: str, name: str) -> None:
    limit = RateLimit(name, 5, per=timedelta(seconds=1))
    (one, two), (first, second) = two_projects(url, name, rate_limit=limit)
    keys = [f"{name}-{i}" for i in range(30)]
    async with one, two:
        for key in keys:
            await first.queue(rate_tasks.start, Job(key=key))
        async with consuming(one, first) as a, consuming(two, second) as b:
            await eventually(lambda: all(rate_tasks.starts(k) for k in keys), timeout=20)
            await a.flush()
            await b.flush()
            assert await one.session.transport.message_count(f"{name}.dlq") == 0
        assert await one.session.transport.message_count(name) == 0
    stamps = [t for k in keys for t in rate_tasks.starts(k)]
    assert len(stamps) == 30  # each ran once: none failed, none was dead-lettered
    assert a.processed > 0 and b.processed > 0  # both connections ran some
    assert rate_tasks.most_in_a_window(stamps, 1.0 - CLOCK_SLACK) <= 5
    assert max(stamps) - min(stamps) >= 5 - CLOCK_SLACK  # 30 starts at 5/s: six windows


@pytest.mark.timeout(40)
async def test_a_tasks_own_limit_holds_across_two_connections(
    url: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rate_tasks.limited, OPTIONS_ATTRIBUTE, rate_tasks.LIMITED, raising=False)
    (one, two), (first, second) = two_projects(url, name)
    keys = [f"{name}-{i}" for i in range(15)]
    async with one, two:
        for key in keys:
            await first.queue(rate_tasks.limited, Job(key=key))
        async with consuming(one, first), consuming(two, second):
            await eventually(lambda: all(rate_tasks.starts(k) for k in keys), timeout=20)
    stamps = [t for k in keys for t in rate_tasks.starts(k)]
    assert len(stamps) == 15
    assert rate_tasks.most_in_a_window(stamps, 1.0 - CLOCK_SLACK) <= 5


@pytest.mark.timeout(30)
async def test_stopping_while_waiting_gives_the_message_back_unrun(url: str, name: str) -> None:
    worker = Worker(name, concurrency=2, rate_limit=RateLimit(name, 1, per=timedelta(minutes=1)))
    project = Project(name=PROJECT, workers=[worker], packages=["tests"], url=url)
    keys = [f"{name}-first", f"{name}-second"]
    async with project:
        for key in keys:
            await worker.queue(rate_tasks.start, Job(key=key))
        async with consuming(project, worker) as consumer:
            await eventually(lambda: any(rate_tasks.starts(k) for k in keys))
            await eventually(lambda: consumer.rate_waits.get(name) == 1)  # the other one waits
        # Stopped: the one that waited is back in the queue, unrun, still on its first attempt.
        transport = project.session.transport
        await eventually(lambda: transport.message_count(name), timeout=5)
        assert await transport.message_count(f"{name}.dlq") == 0
        ran = [k for k in keys if rate_tasks.starts(k)]
        assert len(ran) == 1
        assert consumer.rate_waits.get(name) == 0
        # Consumed again, it still waits for the limit (1 a minute), and it is not a duplicate.
        async with consuming(project, worker) as again:
            await eventually(lambda: again.rate_waits.get(name) == 1)
            assert again.duplicates == 0
    waited = next(k for k in keys if k not in ran)
    assert rate_tasks.starts(waited) == []


@pytest.mark.timeout(30)
async def test_a_given_back_message_keeps_its_attempt(url: str, name: str) -> None:
    worker = Worker(name, concurrency=2, rate_limit=RateLimit(name, 1, per=timedelta(minutes=1)))
    project = Project(name=PROJECT, workers=[worker], packages=["tests"], url=url)
    async with project:
        for i in range(2):
            await worker.queue(rate_tasks.start, Job(key=f"{name}-{i}"))
        async with consuming(project, worker) as consumer:
            await eventually(lambda: consumer.rate_waits.get(name) == 1)
        transport = project.session.transport
        await eventually(lambda: transport.message_count(name), timeout=5)
        messages: list[wire.Message] = []

        async def keep(delivery: Delivery) -> None:
            messages.append(delivery.message)

        subscription = await transport.consume(name, 1, keep)
        await eventually(lambda: messages)
        await subscription.close()
    assert messages[0].attempt == 1


@pytest.mark.timeout(30)
async def test_on_the_virtual_clock_a_window_passes_in_no_time(name: str) -> None:
    """memory://: markers expire on the broker's virtual clock; advancing it frees their slots."""
    url = f"memory://{name}"
    worker = Worker(name, concurrency=10, rate_limit=RateLimit(name, 5, per=timedelta(hours=1)))
    project = Project(name=PROJECT, workers=[worker], packages=["tests"], url=url)
    keys = [f"{name}-{i}" for i in range(15)]
    async with project:
        transport = project.session.transport
        assert isinstance(transport, VirtualClock)
        rate_tasks.CLOCK = lambda: project.session.now().timestamp()
        try:
            for key in keys:
                await worker.queue(rate_tasks.start, Job(key=key))
            began = time.monotonic()
            async with consuming(project, worker) as consumer:

                def started() -> int:
                    return sum(bool(rate_tasks.starts(k)) for k in keys)

                for done in (5, 10):
                    await eventually(lambda n=done: started() == n)  # type: ignore[misc]
                    # Every other delivery it holds (its prefetch, 10) waits: none starts meanwhile.
                    await eventually(lambda n=done: consumer.rate_waits.get(name) == min(10, 15 - n))  # type: ignore[misc]
                    assert started() == done
                    await transport.advance(3600)
                await eventually(lambda: started() == 15)
        finally:
            rate_tasks.CLOCK = time.time
    assert time.monotonic() - began < 10  # three hours of windows
    stamps = sorted(t for k in keys for t in rate_tasks.starts(k))
    assert rate_tasks.most_in_a_window(stamps, 3600) == 5
    assert stamps[-1] - stamps[0] >= 7200


class Waits(Observer):
    def __init__(self) -> None:
        self.told: list[tuple[str, str, int]] = []

    def rate_limited(self, worker: str, limit: str, waiting: int) -> None:
        self.told.append((worker, limit, waiting))


@pytest.mark.timeout(30)
async def test_waiting_for_a_permit_is_seen_by_observers_and_metrics(url: str, name: str) -> None:
    waits, metrics = Waits(), PrometheusMetrics(registry=CollectorRegistry())
    worker = Worker(name, concurrency=3, rate_limit=RateLimit(f"{name}-limit", 1, per=timedelta(minutes=1)))
    project = Project(name=PROJECT, workers=[worker], packages=["tests"], url=url, observers=[waits, metrics])
    labels = {"worker": name, "limit": f"{name}-limit"}

    def gauge() -> float | None:
        return metrics.registry.get_sample_value("nobs_amqp_rate_limit_waiting", labels)

    async with project:
        for i in range(3):
            await worker.queue(rate_tasks.start, Job(key=f"{name}-{i}"))
        async with consuming(project, worker):
            await eventually(lambda: gauge() == 2)  # one ran, two wait
        assert gauge() == 0
    assert waits.told[:2] == [(name, f"{name}-limit", 1), (name, f"{name}-limit", 2)]
    assert waits.told[-1] == (name, f"{name}-limit", 0)


@pytest.mark.timeout(30)
async def test_no_permit_from_an_unreachable_broker_means_the_task_does_not_run(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker's error while taking a permit is handled as any broker error: given back, never run unlimited."""
    url = f"memory://{name}"
    worker = Worker(name, rate_limit=RateLimit(name, 5))
    project = Project(name=PROJECT, workers=[worker], packages=["tests"], url=url)
    tries: list[str] = []

    async def unreachable(queue: str) -> bool:
        tries.append(queue)
        raise BrokerUnavailableError(queue, "the broker stayed unreachable")

    monkeypatch.setattr(consumer_module, "REQUEUE_PAUSE_SECONDS", 0.01)
    async with project:
        monkeypatch.setattr(project.session.transport, "take_permit", unreachable)
        await worker.queue(rate_tasks.start, Job(key=name))
        async with consuming(project, worker):
            await eventually(lambda: len(tries) >= 3)  # given back, delivered again, tried again
        assert await project.session.transport.message_count(name) == 1
        assert await project.session.transport.message_count(f"{name}.dlq") == 0
    assert rate_tasks.starts(name) == []


@pytest.mark.timeout(30)
async def test_drain_moves_the_virtual_clock_through_rate_limit_windows(name: str) -> None:
    """A user's unit test: `drain` on memory:// runs 15 tasks at 5 an hour in no time."""
    worker = Worker(name, rate_limit="5/h")
    project = Project(name=PROJECT, workers=[worker], packages=["tests"], url=f"memory://{name}")
    keys = [f"{name}-{i}" for i in range(15)]
    async with project:
        rate_tasks.CLOCK = lambda: project.session.now().timestamp()
        try:
            for key in keys:
                await worker.queue(rate_tasks.start, Job(key=key))
            assert await drain(project, timeout=20) == 15
        finally:
            rate_tasks.CLOCK = time.time
    stamps = [t for k in keys for t in rate_tasks.starts(k)]
    assert len(stamps) == 15
    assert rate_tasks.most_in_a_window(stamps, 3600) == 5
