"""Broker faults on a throwaway node the test owns: kill -9 of the broker while a producer
publishes and a worker consumes, and a graceful broker restart with delayed and retrying
tasks waiting. The shared broker is never touched.

Each test prints one line `FAULT-FIGURES {json}` (published, confirmed, ran, lost, duplicates,
recovery time) for docs/RELIABILITY.md.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import pytest

from nobs_amqp import BrokerConnectionError, BrokerUnavailableError, Project, PublishError, Worker

from ..apps import tasks
from ..nodes import Node, node_or_skip
from ..support import eventually

PROJECT = "nobs-test"
pytestmark = pytest.mark.rabbitmq  # a throwaway node of the installed RabbitMQ


@pytest.fixture(scope="module")
async def module_node() -> AsyncIterator[Node]:
    node_or_skip()
    async with Node() as node:
        yield node


@pytest.fixture
async def node(module_node: Node) -> Node:
    """The module's node, running (a test that failed half-way may have left it down)."""
    await module_node.start()
    return module_node


def make(url: str, name: str, **options: Any) -> tuple[Project, Worker]:
    worker = Worker(name, **options)
    return Project(name=PROJECT, workers=[worker], url=url, packages=["tests"]), worker


def unique(what: str) -> str:
    return f"{what}-{uuid.uuid4().hex[:8]}"


async def depth(url: str, queue: str) -> int:
    """Messages ready in `queue` (0 if the broker cannot say right now)."""
    try:
        connection = await aio_pika.connect(url, timeout=5)
    except (ConnectionError, OSError, aio_pika.exceptions.AMQPError):
        return -1
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)
    finally:
        await connection.close()


def report(figures: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        print(f"\nFAULT-FIGURES {json.dumps(figures, sort_keys=True)}")


@dataclass
class Ledger:
    """What a producer's queue() calls did."""

    confirmed: list[str] = field(default_factory=list)
    confirmed_at: dict[str, float] = field(default_factory=dict)
    failed: dict[str, BaseException] = field(default_factory=dict)
    attempts: int = 0

    def runs(self) -> dict[str, int]:
        return {key: len(tasks.calls(key)) for key in self.confirmed}


async def produce(worker: Worker, prefix: str, stop: asyncio.Event, ledger: Ledger, limit: int = 3000) -> None:
    """queue() one task after another (bounded in count) until `stop` is set; record each outcome."""
    for i in range(limit):
        if stop.is_set():
            return
        key = f"{prefix}-{i}"
        ledger.attempts += 1
        try:
            # queue() retries through a lost connection for its publish timeout (30 s), then raises.
            await asyncio.wait_for(worker.queue(tasks.record, tasks.Job(key=key, sleep=0.02)), 45)
        except Exception as exc:  # noqa: BLE001 - every outcome is recorded and checked by the test
            ledger.failed[key] = exc
            await asyncio.sleep(0.05)  # the broker is away: do not spin
        else:
            ledger.confirmed.append(key)
            ledger.confirmed_at[key] = time.monotonic()
            await asyncio.sleep(0.005)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@pytest.mark.timeout(90)
async def test_kill_9_of_the_broker_while_publishing_and_consuming_loses_nothing_confirmed(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    name = unique("kill9")
    producer, producing = make(node.url, name)
    consumer, worker = make(node.url, name, concurrency=10)
    prefix = unique("k9")
    ledger = Ledger()
    stop = asyncio.Event()
    async with producer, consumer, consumer.consuming(worker):
        publishing = asyncio.create_task(produce(producing, prefix, stop, ledger))
        try:
            await eventually(lambda: len(ledger.confirmed) >= 150, timeout=20)
            killed = time.monotonic()
            confirmed_before = len(ledger.confirmed)
            await node.kill9()
            dead = time.monotonic()  # confirms between `killed` and here came before the VM died
            await node.start()
            up = time.monotonic()
            # Publishing recovers by itself, then goes on a while.
            await eventually(lambda: len(ledger.confirmed) >= confirmed_before + 150, timeout=30)
        finally:
            stop.set()
            await asyncio.wait_for(publishing, 50)
        last_before = max(t for t in ledger.confirmed_at.values() if t <= dead)
        first_after = min(t for t in ledger.confirmed_at.values() if t > dead)

        def all_ran() -> bool:
            return all(ledger.runs().values())

        try:
            await eventually(all_ran, timeout=30, interval=0.2)
        finally:
            runs = ledger.runs()
            lost = sorted(k for k, n in runs.items() if n == 0)
            unconfirmed_ran = sum(1 for k in ledger.failed if tasks.calls(k))
            figures = {
                "test": "broker kill -9 while publishing and consuming",
                "published": ledger.attempts,
                "confirmed": len(ledger.confirmed),
                "failed": len(ledger.failed),
                "ran": sum(1 for n in runs.values() if n),
                "lost": len(lost),
                "duplicates": sum(n - 1 for n in runs.values() if n > 1),
                "unconfirmed_that_ran": unconfirmed_ran,
                "broker_down_s": round(up - killed, 2),
                # from start() returning; below 0 when the producer got through before the helper's check did
                "publish_recovery_s": round(first_after - up, 2),
                "publish_stall_s": round(first_after - last_before, 2),
                "errors": sorted({type(e).__name__ for e in ledger.failed.values()}),
            }
            report(figures, capsys)
        await eventually(lambda: _drained(node.url, name), timeout=20)
    assert not lost, f"{len(lost)} confirmed tasks never ran, e.g. {lost[:5]}"
    wrong = [describe(e) for e in ledger.failed.values() if not isinstance(e, PublishError | BrokerConnectionError)]
    assert not wrong, f"queue() failed with something other than PublishError/BrokerConnectionError: {wrong[:3]}"
    for exc in ledger.failed.values():
        message = str(exc)
        assert message and "guest:guest@" not in message, message


async def _drained(url: str, queue: str) -> bool:
    return await depth(url, queue) == 0


@pytest.mark.timeout(90)
async def test_graceful_broker_restart_keeps_delayed_retrying_and_waiting_tasks(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    name = unique("restart")
    project, worker = make(node.url, name, concurrency=4)
    prefix = unique("rs")
    waiting = [f"{prefix}-now-{i}" for i in range(40)]  # mostly still in the queue at the restart
    delayed = [f"{prefix}-later-{i}" for i in range(10)]  # in the delay ladder at the restart
    retrying = [f"{prefix}-retry-{i}" for i in range(10)]  # ask for a retry in 1 s, then succeed
    async with project:
        queued_at = time.time()
        for key in delayed:
            await worker.queue(tasks.record, tasks.Job(key=key), delay=8)
        for key in retrying:
            await worker.queue(tasks.ask_retry, tasks.Job(key=key))
        for key in waiting:
            await worker.queue(tasks.record, tasks.Job(key=key, sleep=0.3))
        all_keys = waiting + delayed + retrying
        expected = {k: 2 if k in retrying else 1 for k in all_keys}

        def runs() -> dict[str, int]:
            return {k: len(tasks.calls(k)) for k in all_keys}

        async with project.consuming(worker):
            await eventually(lambda: all(tasks.calls(k) for k in retrying), timeout=20)
            stopping = time.time()
            await node.stop()
            await node.start()
            up = time.time()
            ran_before = sum(1 for k in all_keys if tasks.calls(k))
            try:
                await eventually(lambda: all(n >= expected[k] for k, n in runs().items()), timeout=40, interval=0.2)
            finally:
                after = [t for k in all_keys for t in tasks.calls(k) if t > up]
                lost = sorted(k for k, n in runs().items() if n < expected[k])
                figures = {
                    "test": "graceful broker restart with delayed and retrying tasks",
                    "published": len(all_keys),
                    "confirmed": len(all_keys),
                    "ran_before_restart": ran_before,
                    "ran": sum(1 for k, n in runs().items() if n >= expected[k]),
                    "lost": len(lost),
                    "duplicates": sum(max(0, n - expected[k]) for k, n in runs().items()),
                    "broker_restart_s": round(up - stopping, 2),
                    "consume_recovery_s": round(min(after) - up, 2) if after else None,
                }
                report(figures, capsys)
    assert not lost, f"tasks that did not run (enough) after the restart: {lost[:5]}"
    early = [k for k in delayed if tasks.calls(k)[0] - queued_at < 7.5]
    assert not early, f"delayed tasks ran before their delay: {early[:3]}"


@pytest.mark.timeout(90)
async def test_a_broker_that_stays_down_fails_queue_with_a_clear_error(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    """queue() retries through the outage for its publish timeout (here 5 s), then raises
    BrokerUnavailableError; opening a project on a dead broker raises BrokerConnectionError at once.
    Neither shows the password."""
    name = unique("down")
    worker = Worker(name)
    project = Project(name=PROJECT, workers=[worker], url=node.url, packages=["tests"], publish_timeout=5)
    async with project:
        await worker.queue(tasks.record, tasks.Job(key=unique("warm")))  # declared, connection open
        await node.kill9()
        began = time.monotonic()
        with pytest.raises(PublishError) as caught:
            await asyncio.wait_for(worker.queue(tasks.record, tasks.Job(key=unique("lost"))), 60)
        gave_up = time.monotonic() - began
        fresh, _ = make(node.url, name)
        opening = time.monotonic()
        with pytest.raises(BrokerConnectionError) as refused:
            await asyncio.wait_for(fresh.open(), 30)
        open_failed = time.monotonic() - opening
        await node.start()
        key = unique("after")
        await asyncio.wait_for(worker.queue(tasks.record, tasks.Job(key=key)), 45)  # the same project recovers
    report(
        {
            "test": "broker down longer than the publish timeout",
            "queue_raised_after_s": round(gave_up, 1),
            "queue_error": describe(caught.value),
            "open_raised_after_s": round(open_failed, 1),
            "open_error": describe(refused.value),
        },
        capsys,
    )
    for error in (caught.value, refused.value):
        assert str(error) and "guest:guest@" not in str(error), str(error)
    assert isinstance(caught.value, BrokerUnavailableError)
    assert "unreachable for 5 s" in str(caught.value), str(caught.value)
    assert 4.5 <= gave_up < 15, gave_up
