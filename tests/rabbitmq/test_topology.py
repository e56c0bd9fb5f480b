"""The broker objects, their arguments, and what happens when they disagree."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import pytest

from nobs_amqp import ConfigurationError, Project, TopologyMismatchError, UnroutableError, Worker, ladder
from nobs_amqp.consumer import Consumer
from nobs_amqp.management import Management

from ..apps import tasks
from ..support import Broker


def vhost(url: str) -> str:
    return unquote(urlsplit(url).path[1:])


async def broker_major(management: Management) -> int:
    """The broker's major version, from the management API."""
    overview = await management.request("GET", "/api/overview")
    return int(str(overview["rabbitmq_version"]).split(".")[0])


def test_routing_keys_spell_the_delay_in_bits() -> None:
    assert ladder.routing_key(5, "q") == ".".join(["0"] * 25 + ["1", "0", "1"]) + ".q"
    assert ladder.route("p", 5, "q")[0] == "p.delay.02"
    assert ladder.route("p", 1, "q")[0] == "p.delay.00"
    assert ladder.delay_seconds(0) == 0
    assert ladder.delay_seconds(0.2) == 1
    assert ladder.delay_seconds(2.0) == 2
    assert ladder.delay_seconds(2.01) == 3
    with pytest.raises(ConfigurationError, match="longer than the maximum"):
        ladder.delay_seconds(2**28)


async def test_declared_objects_and_arguments(amqp_url: str, name: str) -> None:
    worker = Worker(name, delivery_limit=4)
    project = Project(name="nobs-test", workers=[worker], packages=["tests"])
    async with project:
        await project.session.declare(worker, delayed=True)
    management = Management(amqp_url)
    main = await management.queue(vhost(amqp_url), name)
    dlq = await management.queue(vhost(amqp_url), f"{name}.dlq")
    level = await management.queue(vhost(amqp_url), "nobs-test.delay.03")
    assert main is not None and dlq is not None and level is not None
    assert main["durable"] and dlq["durable"] and level["durable"]
    assert main["arguments"] == {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": f"{name}.dlx",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-delivery-limit": 4,
        "x-quorum-initial-group-size": 3,  # Project(replicas=3), the default: only at creation
    }
    # RabbitMQ 4.x gives every quorum queue a delivery limit of 20 unless told otherwise; the
    # DLQ must never drop what it holds, so there it is declared unlimited (-1).
    unlimited = {"x-delivery-limit": -1} if await broker_major(management) >= 4 else {}
    assert dlq["arguments"] == {"x-queue-type": "quorum", "x-quorum-initial-group-size": 3, **unlimited}
    assert not dlq["auto_delete"] and "x-expires" not in dlq["arguments"]
    assert level["arguments"]["x-message-ttl"] == 8000
    assert level["arguments"]["x-dead-letter-exchange"] == "nobs-test.delay.02"


async def test_mismatch_names_object_difference_and_fix(amqp_url: str, name: str, broker: Broker) -> None:
    channel = await broker.channel()
    await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "classic"})
    await channel.close()
    worker = Worker(name)
    project = Project(name="nobs-test", workers=[worker], packages=["tests"])
    async with project:
        with pytest.raises(TopologyMismatchError) as caught:
            await worker.queue(tasks.record, tasks.Job(key="x"))
    error = caught.value
    assert error.kind == "queue" and error.name == name
    assert "x-queue-type" in error.difference and "quorum" in error.difference
    assert f"rabbitmqctl delete_queue {name} -p {vhost(amqp_url)}" in str(error)
    assert await broker.count(name) == 0  # the existing queue was left alone


async def test_unroutable_publish_raises(amqp_url: str, name: str, broker: Broker) -> None:
    worker = Worker(name)
    project = Project(name="nobs-test", workers=[worker], packages=["tests"])
    async with project:
        await project.session.declare(worker, delayed=False)
        channel = await broker.channel()
        await channel.queue_delete(name)
        await channel.close()
        with pytest.raises(UnroutableError, match="no queue received it"):
            await worker.queue(tasks.record, tasks.Job(key="x"))


async def test_delayed_message_to_a_deleted_queue_lands_in_unroutable(amqp_url: str, name: str, broker: Broker) -> None:
    worker = Worker(name)
    project = Project(name="nobs-test", workers=[worker], packages=["tests"])
    async with project:
        await worker.queue(tasks.record, tasks.Job(key="lost"), delay=1)
        channel = await broker.channel()
        await channel.queue_delete(name)
        await channel.close()
    # Other tests' delayed messages whose queues were deleted land there too: find ours.
    for _ in range(50):
        [message] = await broker.take(ladder.unroutable_name("nobs-test"), timeout=10)
        if message.routing_key is not None and message.routing_key.endswith("." + name):
            break
    else:
        raise AssertionError("the delayed message did not reach the unroutable queue")
    assert message.body == b'{"key":"lost","fail_times":0,"sleep":0.0}'


async def test_priorities_on_a_classic_queue(amqp_url: str, name: str) -> None:
    worker = Worker(name, queue_type="classic", max_priority=5, concurrency=1, prefetch=1)
    project = Project(name="nobs-test", workers=[worker], packages=["tests"])
    keys = [f"{name}-{i}" for i in range(4)]
    async with project:
        for i, k in enumerate(keys):
            await worker.queue(tasks.record, tasks.Job(key=k), priority=i)
        consumer = Consumer(project.session, worker, burst=True)
        await consumer.run()
    order = sorted(keys, key=lambda k: tasks.calls(k)[0])
    assert order == list(reversed(keys))
