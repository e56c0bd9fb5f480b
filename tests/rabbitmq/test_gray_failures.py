"""Gray failures: a broker that blocks publishers (a resource alarm), a connection that stalls
without closing, and a message over the broker's size limit. Each test failed before its fix
(issue 17, items 1-3); each prints `GRAY-FIGURES {json}` for docs/RELIABILITY.md.

The alarm tests run on a throwaway node (`set_vm_memory_high_watermark 0` turns the alarm on);
the stall tests put a proxy in front of the shared broker and make it a black hole; the size
tests use the shared broker. The shared broker is never stopped or reconfigured.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import tenacity
from prometheus_client import CollectorRegistry

from nobs_amqp import (
    BrokerBlockedError,
    MessageTooLargeError,
    Project,
    PublishUnconfirmedError,
    Worker,
)
from nobs_amqp.cli import STOP_MARGIN_SECONDS
from nobs_amqp.observe.metrics import PrometheusMetrics
from nobs_amqp.observe.observer import Observer
from nobs_amqp.topology import dead_letter_queue
from nobs_amqp.transports.base import default_max_message_size

from ..apps import tasks
from ..nodes import Node, node_or_skip
from ..proxy import Proxy
from ..support import eventually, exit_code, output, take_messages, worker_process

PROJECT = "nobs-gray"
#: publish_timeout of the alarm tests: past it, the old code gave a publish up (and its message ran anyway).
PUBLISH_TIMEOUT = 3.0


def unique(what: str) -> str:
    return f"{what}-{uuid.uuid4().hex[:8]}"


def report(figures: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        print(f"\nGRAY-FIGURES {json.dumps(figures, sort_keys=True)}")


def make(url: str, name: str, *, project: dict[str, Any] | None = None, **options: Any) -> tuple[Project, Worker]:
    worker = Worker(name, **options)
    return Project(name=PROJECT, workers=[worker], url=url, packages=["tests.apps"], **(project or {})), worker


def gauge(metrics: PrometheusMetrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name)


# -- 1. a resource alarm: the broker blocks publishers ---------------------------------------------


@pytest.fixture(scope="module")
async def alarm_node() -> AsyncIterator[Node]:
    node_or_skip()
    async with Node() as node:
        yield node


async def alarm(node: Node, on: bool) -> None:
    """Turn the node's memory alarm on (a watermark of 0: always over it) or off (the default 0.4)."""
    await node.ctl("set_vm_memory_high_watermark", "0" if on else "0.4")


async def queue_counts(node: Node, queue: str) -> tuple[int, int]:
    """(ready, unacknowledged) of `queue` on `node`, as the broker counts them."""
    columns = ("name", "messages_ready", "messages_unacknowledged")
    text = await node.ctl("list_queues", "-q", "--no-table-headers", *columns)
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == queue:
            return int(fields[1]), int(fields[2])
    raise AssertionError(f"no queue {queue} in:\n{text}")


@pytest.mark.rabbitmq
@pytest.mark.timeout(60)
async def test_queue_during_a_memory_alarm_raises_only_unsent_or_says_it_may_be_sent(
    alarm_node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: all 30 queue() calls raised BrokerUnavailableError after publish_timeout, and all
    30 ran once the alarm cleared. Now the one that was written (RabbitMQ blocks a connection
    only once it publishes) raises PublishUnconfirmedError with its id, the others
    BrokerBlockedError without sending anything; exactly the first runs."""
    name = unique("alarm-q")
    project, worker = make(alarm_node.url, name, project={"publish_timeout": PUBLISH_TIMEOUT})
    first, rest = unique("first"), [unique("rest") for _ in range(29)]
    async with project:
        await project.session.declare(worker, delayed=False)
        await alarm(alarm_node, True)
        try:
            started = time.monotonic()
            with pytest.raises(PublishUnconfirmedError) as unconfirmed:
                await worker.queue(tasks.record, tasks.Job(key=first))
            raised_after = time.monotonic() - started
            assert unconfirmed.value.maybe_sent and unconfirmed.value.message_id
            assert unconfirmed.value.message_id in str(unconfirmed.value)
            assert "blocked" in str(unconfirmed.value)
            reason = project.session.transport.blocked  # type: ignore[attr-defined]
            assert reason is not None
            results = await asyncio.gather(
                *(worker.queue(tasks.record, tasks.Job(key=k)) for k in rest), return_exceptions=True
            )
            assert all(isinstance(r, BrokerBlockedError) and not r.maybe_sent for r in results), results
        finally:
            await alarm(alarm_node, False)
        await eventually(lambda: project.session.transport.blocked is None, timeout=15)  # type: ignore[attr-defined]
        after = unique("after")
        await worker.queue(tasks.record, tasks.Job(key=after))  # publishing works again
        async with project.consuming(worker):
            await eventually(lambda: tasks.calls(first) and tasks.calls(after), timeout=15)
            assert await project.session.transport.message_count(name) == 0
    ran_unsent = [k for k in rest if tasks.calls(k)]
    assert ran_unsent == [], "a queue() that said 'not sent' ran"
    assert len(tasks.calls(first)) == 1
    report(
        {
            "test": "queue() during a memory alarm",
            "broker_reason": reason,
            "maybe_sent_raised": 1,
            "not_sent_raised": len(results),
            "ran_of_maybe_sent": len(tasks.calls(first)),
            "ran_of_not_sent": len(ran_unsent),
            "raised_after_s": round(raised_after, 2),
        },
        capsys,
    )


@pytest.mark.rabbitmq
@pytest.mark.timeout(90)
async def test_a_worker_during_a_memory_alarm_keeps_acking_and_never_forks_a_retry(
    alarm_node: Node, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Before: retry copies timed out during the alarm, their deliveries went back to the queue
    while the copies ran too (attempts 1,1,2,2,3,3 and two dead letters for 5 of 10 tasks), and
    the worker's acks waited behind its blocked connection. Now a copy waits for the alarm to
    clear while its delivery waits, successes are acked on the consuming connection meanwhile,
    health says "blocked" (still ready) and the metric is 1."""
    caplog.set_level(logging.WARNING, logger="nobs_amqp")
    name = unique("alarm-w")
    metrics = PrometheusMetrics(registry=CollectorRegistry())
    project, worker = make(
        alarm_node.url,
        name,
        project={"publish_timeout": PUBLISH_TIMEOUT, "observers": [metrics]},
        stop=tenacity.stop_after_attempt(3),
        wait=tenacity.wait_none(),
        concurrency=20,
    )
    failing, good = [unique("fail") for _ in range(10)], [unique("good") for _ in range(20)]
    async with project:
        await worker.queue_many(tasks.always_fail, [tasks.Job(key=k) for k in failing])
        await worker.queue_many(tasks.record, [tasks.Job(key=k) for k in good])
        await alarm(alarm_node, True)
        try:
            async with project.consuming(worker):
                await eventually(lambda: project.session.transport.blocked, timeout=15)  # type: ignore[attr-defined]
                await eventually(lambda: all(tasks.calls(k) for k in good), timeout=15)
                # Every success acked while the alarm is on: the broker holds only the failing ones.
                await eventually(lambda: _only_failing_held(alarm_node, name, len(failing)), timeout=15)
                health = metrics.health.report()
                assert health["ready"] and health["connection"] == "blocked", health
                assert gauge(metrics, "nobs_amqp_publishing_blocked") == 1
                blocked_at = time.monotonic()
                # Past twice the publish timeout, where the old code gave the retry copies up (and
                # a copy given up is published once more after declaring the topology again).
                await asyncio.sleep(3 * PUBLISH_TIMEOUT)
                assert all(len(tasks.calls(k)) == 1 for k in failing), "a delivery ran again during the alarm"
                for given_up in ("cannot be placed", "declaring the topology again", "was not confirmed"):
                    assert given_up not in caplog.text, caplog.text
                await alarm(alarm_node, False)
                await eventually(lambda: _dead(project, name, len(failing)), timeout=30)
                health = metrics.health.report()
                assert health["connection"] == "up", health
                assert gauge(metrics, "nobs_amqp_publishing_blocked") == 0
        finally:
            await alarm(alarm_node, False)
        dead = await take_messages(project, dead_letter_queue(name), len(failing))
    runs = {k: len(tasks.calls(k)) for k in failing}
    assert runs == dict.fromkeys(failing, 3), runs  # attempts 1, 2, 3: once each
    assert sorted(d.headers["x-nobs-attempt"] for d in dead) == [3] * len(failing)
    assert all(len(tasks.calls(k)) == 1 for k in good)
    assert "the broker blocked the publishing connection" in caplog.text
    assert "unblocked the publishing connection" in caplog.text
    report(
        {
            "test": "a worker during a memory alarm",
            "failing_tasks": len(failing),
            "runs_per_failing_task": sorted(set(runs.values())),
            "dead_letters": len(dead),
            "successes_acked_during_alarm": len(good),
            "blocked_s": round(time.monotonic() - blocked_at, 1),
        },
        capsys,
    )


async def _only_failing_held(node: Node, queue: str, failing: int) -> bool:
    ready, unacked = await queue_counts(node, queue)
    return ready == 0 and unacked <= failing


async def _dead(project: Project, name: str, count: int) -> bool:
    return await project.session.transport.message_count(dead_letter_queue(name)) >= count


# -- 2. a stalled connection: nothing answers, nothing closes ------------------------------------


class Readiness(Observer):
    """When `/readyz` (the metrics' health) first said not ready, and when ready again after that."""

    def __init__(self, metrics: PrometheusMetrics) -> None:
        self.metrics = metrics
        self.not_ready_at: float | None = None
        self.ready_again_at: float | None = None

    def connection(self, up: bool) -> None:  # told after the metrics' health (observers in order)
        ready = self.metrics.health.report()["ready"]
        if not ready and self.not_ready_at is None:
            self.not_ready_at = time.monotonic()
        elif ready and self.not_ready_at is not None and self.ready_again_at is None:
            self.ready_again_at = time.monotonic()


@pytest.mark.timeout(60)
async def test_a_stalled_connection_is_found_within_the_heartbeat_and_readiness_says_so(
    vhost_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: the worker noticed after about 183 s (3 x the 60 s heartbeat) and /readyz said
    ready the whole time. Now (heartbeat 10 s by default) it is found within heartbeat + 1 s
    and the heartbeat's check interval, readiness fails until the worker is back, and a queue()
    caught in the stall is sent again and confirmed within its publish_timeout."""
    name = unique("stall")
    metrics = PrometheusMetrics(registry=CollectorRegistry())
    seen = Readiness(metrics)
    async with Proxy() as proxy:
        project, worker = make(proxy.url_for(vhost_url), name, project={"observers": [metrics, seen]})
        async with project, project.consuming(worker):
            assert metrics.health.report()["ready"]
            stalled = proxy.stall()
            started = time.monotonic()
            caught = unique("caught")
            queued = asyncio.create_task(worker.queue(tasks.record, tasks.Job(key=caught)))
            await eventually(lambda: seen.not_ready_at, timeout=30, interval=0.1)
            assert seen.not_ready_at is not None
            found = seen.not_ready_at - started
            await eventually(lambda: seen.ready_again_at, timeout=20, interval=0.1)
            assert seen.ready_again_at is not None
            ready_again = seen.ready_again_at - started
            await asyncio.wait_for(queued, 30)
            confirmed = time.monotonic() - started
            after = unique("after")
            await worker.queue(tasks.record, tasks.Job(key=after))
            await eventually(lambda: tasks.calls(caught) and tasks.calls(after), timeout=15)
    heartbeat = 10
    assert found <= heartbeat + 1 + heartbeat / 2 + 2, found
    assert len(tasks.calls(caught)) == 1
    report(
        {
            "test": "a stalled connection (default heartbeat 10 s)",
            "stalled_connections": stalled,
            "not_ready_after_s": round(found, 1),
            "ready_again_after_s": round(ready_again, 1),
            "queue_confirmed_after_s": round(confirmed, 1),
            "caught_queue_ran": len(tasks.calls(caught)),
        },
        capsys,
    )


@pytest.mark.timeout(60)
async def test_sigterm_during_a_stall_exits_within_the_grace_period(
    vhost_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: SIGTERM during a stall never exited (the drain waited on basic.cancel with no
    timeout), and a second SIGTERM logged "stopping now" and still did not exit."""
    name = unique("stall-term")
    grace = 2.0
    log = tmp_path / "worker.log"
    async with Proxy() as proxy:
        project, _ = make(vhost_url, name)
        async with project:
            await project.session.declare(project.worker(name), delayed=True)
        url = proxy.url_for(vhost_url)
        with worker_process(url, name, log, "--grace-period", str(grace)) as proc:
            await eventually(lambda: "consuming" in output(log), timeout=20)
            proxy.stall()
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = await exit_code(proc, log, timeout=grace + STOP_MARGIN_SECONDS + 10)
            took = time.monotonic() - started
    assert code == 0, output(log)
    assert took <= grace + STOP_MARGIN_SECONDS + 1, (took, output(log))
    report({"test": "SIGTERM during a stall", "grace_period_s": grace, "exited_after_s": round(took, 1)}, capsys)


# -- 3. a message over the broker's size limit ---------------------------------------------------


@pytest.mark.timeout(30)
async def test_a_message_over_the_size_limit_fails_at_the_call_site(url: str, name: str) -> None:
    """Checked before anything is sent: queue() and queue_many() raise MessageTooLargeError (not
    sent) and nothing reaches the queue."""
    project, worker = make(url, name, project={"max_message_size": 1000})
    big = tasks.Job(key="x" * 2000)
    async with project:
        started = time.monotonic()
        with pytest.raises(MessageTooLargeError) as raised:
            await worker.queue(tasks.record, big)
        assert time.monotonic() - started < 1
        assert not raised.value.maybe_sent and raised.value.message_id
        assert "Project(max_message_size=...)" in str(raised.value)
        with pytest.raises(MessageTooLargeError):
            await worker.queue_many(tasks.record, [tasks.Job(key=unique("small")), big])
        await project.session.declare(worker, delayed=False)
        assert await project.session.transport.message_count(name) == 0


@pytest.mark.rabbitmq
@pytest.mark.timeout(120)
async def test_a_message_the_broker_refuses_fails_alone(
    vhost_url: str, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: a 140 MB queue() over the broker's max message size closed its pool channel, and
    25 of 100 concurrent small queue() calls on it raised its PRECONDITION_FAILED and were not
    sent. Now (the project's own limit set above the broker's, so the broker refuses it) the big
    one raises MessageTooLargeError naming the broker's limit and every small one is sent."""
    project, worker = make(vhost_url, name, project={"max_message_size": 1024**3})
    small = [unique("small") for _ in range(100)]
    async with project:
        await project.session.declare(worker, delayed=False)
        limit = default_max_message_size(project.session.transport.server_version)
        big = tasks.Job(key="x" * (limit + 1024 * 1024))
        results = await asyncio.gather(
            worker.queue(tasks.record, big),
            *(worker.queue(tasks.record, tasks.Job(key=k)) for k in small),
            return_exceptions=True,
        )
        refused, sent = results[0], results[1:]
        assert isinstance(refused, MessageTooLargeError), refused
        assert "the broker's max_message_size" in str(refused) and f"{limit:,}" in str(refused)
        failed = [r for r in sent if isinstance(r, BaseException)]
        assert failed == [], failed[:3]
        async with project.consuming(worker):
            await eventually(lambda: all(tasks.calls(k) for k in small), timeout=30)
    assert all(len(tasks.calls(k)) == 1 for k in small)
    report(
        {
            "test": "a message over the broker's limit among 100 small ones",
            "big_bytes": len(big.model_dump_json()),
            "broker_limit": limit,
            "small_failed": len(failed),
            "small_ran": sum(1 for k in small if tasks.calls(k)),
        },
        capsys,
    )
