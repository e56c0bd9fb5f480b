"""Failover over a cluster's URLs (issue 12): which node comes next, how long to wait, and a
client that moves to the next node that answers when its node goes away; quorum queues
created with `Project(replicas=...)` members, and existing queues keeping theirs.

The "nodes" of the failover tests are TCP proxies in front of the shared broker
(tests/proxy.py): losing one refuses and cuts its connections, so these run in seconds.
tests/rabbitmq/test_cluster.py does the same against a real three-node cluster.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from urllib.parse import quote

import aio_pika
import pytest
from prometheus_client import CollectorRegistry

from nobs_amqp import BrokerUnavailableError, ConfigurationError, Project, TopologyMismatchError, Worker
from nobs_amqp.consumer import Consumer
from nobs_amqp.management import Management
from nobs_amqp.observe.metrics import PrometheusMetrics
from nobs_amqp.ops.status import project_status, topology_diff
from nobs_amqp.topology import INITIAL_GROUP_SIZE, QueueOptions, worker_topology
from nobs_amqp.transports.amqp.failover import (
    ATTEMPT_METHOD,
    NEXT_NODE_SECONDS,
    RECONNECT_MAX_SECONDS,
    RECONNECT_MIN_SECONDS,
    pause_after,
)
from nobs_amqp.urls import node_address, vhost_of

from ..apps import tasks
from ..proxy import Proxy
from ..support import Broker, eventually

PROJECT = "nobs-test"


# -- which node next, and how long to wait ------------------------------------------------------


def test_the_next_node_is_tried_at_once_and_each_failed_round_doubles_the_wait() -> None:
    # Three nodes: two quick tries within a round, then a wait that doubles per round, capped.
    assert [pause_after(n, 3, 0.0) for n in range(1, 13)] == [
        NEXT_NODE_SECONDS,
        NEXT_NODE_SECONDS,
        RECONNECT_MIN_SECONDS,
        NEXT_NODE_SECONDS,
        NEXT_NODE_SECONDS,
        2 * RECONNECT_MIN_SECONDS,
        NEXT_NODE_SECONDS,
        NEXT_NODE_SECONDS,
        4 * RECONNECT_MIN_SECONDS,
        NEXT_NODE_SECONDS,
        NEXT_NODE_SECONDS,
        RECONNECT_MAX_SECONDS,
    ]
    assert pause_after(3 * 10_000, 3, 0.0) == RECONNECT_MAX_SECONDS  # a long outage: still the cap
    # One node: every attempt ends a round.
    assert [pause_after(n, 1, 0.0) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    # Jitter takes off up to half of a wait between rounds, never of the quick tries.
    assert pause_after(1, 1, 0.999) == pytest.approx(0.25, abs=0.001)
    assert pause_after(4, 1, 0.5) == pytest.approx(0.75 * RECONNECT_MAX_SECONDS)
    assert pause_after(1, 3, 0.999) == NEXT_NODE_SECONDS


def test_aio_pika_still_makes_its_attempts_through_the_method_failover_overrides() -> None:
    """Failover hooks aio-pika's one connection attempt, a private method: an aio-pika that
    renamed it would reconnect to one node only. This is the test that says so."""
    method = getattr(aio_pika.RobustConnection, ATTEMPT_METHOD, None)
    assert method is not None and inspect.iscoroutinefunction(method), f"aio-pika {aio_pika.__version__}"


@pytest.mark.parametrize("replicas", [0, -1, True, 2.5, "3"])
def test_replicas_must_be_a_whole_number_of_nodes(replicas: object) -> None:
    with pytest.raises(ConfigurationError, match="replicas must be a whole number of nodes"):
        Project(name=PROJECT, replicas=replicas)  # type: ignore[arg-type]


# -- failing over -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_a_lost_node_fails_over_to_the_next_that_answers_for_producer_and_consumer(
    amqp_url: str, name: str, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nobs_amqp")
    registry = CollectorRegistry()
    worker = Worker(name)
    async with Proxy() as first, Proxy() as down, Proxy() as third:
        down.refusing = True  # a node that is down the whole time: skipped on the way
        urls = [first.url_for(amqp_url), down.url_for(amqp_url), third.url_for(amqp_url)]
        project = Project(
            name=PROJECT,
            workers=[worker],
            url=urls,
            packages=["tests"],
            observers=[PrometheusMetrics(registry=registry)],
        )
        async with project:
            consumer = Consumer(project.session, worker)
            running = asyncio.create_task(consumer.run())
            try:
                before = f"before-{uuid.uuid4().hex[:8]}"
                await worker.queue(tasks.record, tasks.Job(key=before))
                await eventually(lambda: tasks.calls(before) != [], timeout=10)
                assert project.session.node == node_address(urls[0])
                assert registry.get_sample_value("nobs_amqp_broker_node", {"node": node_address(urls[0])}) == 1

                first.refusing = True  # the first node goes away
                lost = time.monotonic()
                assert first.cut() >= 1
                await eventually(lambda: project.session.node == node_address(urls[2]), timeout=10)
                moved = time.monotonic() - lost

                after = f"after-{uuid.uuid4().hex[:8]}"
                await asyncio.wait_for(worker.queue(tasks.record, tasks.Job(key=after)), 15)
                await eventually(lambda: tasks.calls(after) != [], timeout=15)  # consumed again, on node 3
                assert third.open_connections >= 1 and first.open_connections == 0
                report = await project_status(project)
            finally:
                consumer.stop()
                await asyncio.wait_for(running, 15)
    assert moved < 3, f"failing over took {moved:.1f} s with a node that answers"
    assert down.refused >= 1, "the node that was down was never tried"
    assert registry.get_sample_value("nobs_amqp_broker_node", {"node": node_address(urls[0])}) == 0
    assert registry.get_sample_value("nobs_amqp_broker_node", {"node": node_address(urls[2])}) == 1
    assert report.node == node_address(urls[2])
    [row] = [w for w in report.workers if w.name == name]
    assert (row.members, row.online) == (1, 1) and row.leader, row
    lines = [r.getMessage() for r in caplog.records if r.name == "nobs_amqp"]
    text = "\n".join(lines)
    assert any("did not answer" in line and node_address(urls[1]) in line for line in lines), text
    assert any(line.startswith("reconnected to") and node_address(urls[2]) in line for line in lines), text
    assert "guest:guest" not in text


# -- replicas -------------------------------------------------------------------------------


async def _members(amqp_url: str, queue: str) -> dict[str, object]:
    info = await Management(amqp_url).queue(vhost_of(amqp_url), queue)
    assert info is not None, f"queue {queue} does not exist"
    return info


@pytest.mark.timeout(60)
async def test_new_quorum_queues_get_the_replica_count_and_existing_ones_keep_theirs(
    amqp_url: str, name: str, broker: Broker
) -> None:
    # A queue made before the option existed (as an earlier release declared it), and one made
    # with another count: both are used as they are, and `topology diff` finds nothing to change.
    older, other = f"{name}-older", f"{name}-other"
    channel = await broker.channel()
    for queue, extra in ((older, {}), (other, {INITIAL_GROUP_SIZE: 1})):
        spec = worker_topology(queue, QueueOptions(), (3, 10))
        await channel.declare_queue(queue, durable=True, arguments={**spec.queues[0].arguments, **extra})
    try:
        workers = [Worker(n) for n in (name, older, other)]
        project = Project(name=PROJECT, workers=workers, url=amqp_url, packages=["tests"], replicas=5)
        async with project:
            for worker in workers:
                await worker.queue(tasks.record, tasks.Job(key=f"replicas-{uuid.uuid4().hex[:8]}"))
            diff = await topology_diff(project)
        arguments = {q: (await _members(amqp_url, q))["arguments"] for q in (name, f"{name}.dlq", older, other)}
        assert arguments[name][INITIAL_GROUP_SIZE] == 5  # type: ignore[index]
        assert arguments[f"{name}.dlq"][INITIAL_GROUP_SIZE] == 5  # type: ignore[index]
        assert INITIAL_GROUP_SIZE not in arguments[older]  # type: ignore[operator]
        assert arguments[other][INITIAL_GROUP_SIZE] == 1  # type: ignore[index]
        assert not [line for line in diff if " differs: " in line], diff
        for queue in (name, older, other):
            assert await broker.count(queue) == 1

        # Another argument that differs is still a mismatch, named without the replica count.
        changed = Worker(older, delivery_limit=3)
        async with Project(name=PROJECT, workers=[changed], url=amqp_url, packages=["tests"]) as again:
            with pytest.raises(TopologyMismatchError) as raised:
                await again.session.declare(changed, delayed=False)
        assert "x-delivery-limit" in str(raised.value) and INITIAL_GROUP_SIZE not in str(raised.value)
    finally:
        for queue in (older, other, f"{older}.dlq", f"{other}.dlq"):
            await (await broker.channel()).queue_delete(queue)
        for exchange in (f"{older}.dlx", f"{other}.dlx"):
            await (await broker.channel()).exchange_delete(exchange)


# -- a queue that refuses messages for now (basic.nack) ----------------------------------------


@pytest.mark.timeout(60)
async def test_a_nacked_publish_is_sent_again_until_the_queue_takes_it_then_raises_unavailable(
    amqp_url: str, name: str, broker: Broker
) -> None:
    """A quorum queue nacks publishes while it elects a leader (a node of its cluster died) or while
    it is full: queue() sends again until the deadline instead of failing at the first nack."""
    vhost, management = vhost_of(amqp_url), Management(amqp_url)
    policy = f"/api/policies/{quote(vhost, safe='')}/{name}-full"
    await management.request(
        "PUT",
        policy,
        {"pattern": f"^{name}$", "definition": {"max-length": 1, "overflow": "reject-publish"}, "apply-to": "queues"},
    )
    try:
        worker = Worker(name)
        async with Project(name=PROJECT, workers=[worker], url=amqp_url, packages=["tests"], publish_timeout=20):
            await worker.queue(tasks.record, tasks.Job(key="first"))

            async def full() -> bool:
                return (await _members(amqp_url, name)).get("effective_policy_definition", {}).get("max-length") == 1  # type: ignore[union-attr]

            await eventually(full, timeout=10)
            # Over its limit (a quorum queue takes one message past it), queue() is nacked, and
            # sends again for as long as the queue stays full.
            pending = None
            for i in range(3):
                sending = asyncio.create_task(worker.queue(tasks.record, tasks.Job(key=f"fill-{i}")))
                await asyncio.sleep(1.0)
                if not sending.done():
                    pending = sending
                    break
                await sending
            assert pending is not None, "the full queue never refused a message"
            await broker.take(name, n=await broker.count(name))  # room again
            message_id = await asyncio.wait_for(pending, 10)
            [last] = await broker.take(name)
            assert last.message_id == message_id

        # Full for longer than the deadline: BrokerUnavailableError, saying why.
        again = Worker(name)
        async with Project(name=PROJECT, workers=[again], url=amqp_url, packages=["tests"], publish_timeout=1.5):
            raised = []
            for i in range(3):
                try:
                    await again.queue(tasks.record, tasks.Job(key=f"over-{i}"))
                except BrokerUnavailableError as exc:
                    raised.append(str(exc))
                    break
        assert raised and "basic.nack" in raised[0] and "full" in raised[0] and "no leader" in raised[0], raised
    finally:
        await management.request("DELETE", policy)
