"""Every test session gets its own vhost on a real RabbitMQ, made and removed through
the management API; every test gets unique worker names inside it.

A test that needs a RabbitMQ carries the `rabbitmq` marker: set here for every test that uses
the shared broker through a fixture (or runs on the `url` fixture's rabbitmq case), and by hand
on tests that reach one another way (throwaway nodes, subprocesses given its URL).
`pytest -m "not rabbitmq"` runs the rest, memory:// included, with no broker at all.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import aio_pika
import pytest

from nobs_amqp.transports.memory import MemoryBroker

from .support import Broker

#: Fixtures that reach the shared RabbitMQ: a test that uses one, directly or through another, needs it.
RABBITMQ_FIXTURES = frozenset({"nobs_amqp_vhost", "nobs_amqp_url", "vhost_url", "amqp_url", "broker"})


def uses_shared_rabbitmq(item: pytest.Item) -> bool:
    """Whether `item` runs on the shared RabbitMQ: through a fixture, or as the `url` fixture's rabbitmq case."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and callspec.params.get("url") == "rabbitmq":
        return True
    return not RABBITMQ_FIXTURES.isdisjoint(getattr(item, "fixturenames", ()))


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if uses_shared_rabbitmq(item):
            item.add_marker(pytest.mark.rabbitmq)


@pytest.fixture(scope="session")
def vhost_url(nobs_amqp_vhost: str) -> str:
    """The session's own vhost, from the plugin nobs_amqp ships (dogfooded here)."""
    return nobs_amqp_vhost


@pytest.fixture
def amqp_url(vhost_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The session vhost's URL, also set as NOBS_AMQP_URL for code under test."""
    monkeypatch.setenv("NOBS_AMQP_URL", vhost_url)
    return vhost_url


@pytest.fixture
async def name(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A queue name unique to this test; on the shared RabbitMQ its queues are deleted afterwards
    (a test on memory:// needs no broker for it).

    Every quorum queue holds a few of the broker's file handles (927 with Debian's
    default ulimit of 1024): a suite that kept all of its queues would run out.
    """
    unique = f"{request.node.name[:40].replace('[', '-').replace(']', '')}-{uuid.uuid4().hex[:6]}"
    vhost_url: str | None = request.getfixturevalue("vhost_url") if uses_shared_rabbitmq(request.node) else None
    yield unique
    if vhost_url is None:
        return
    connection = await aio_pika.connect(vhost_url)
    try:
        channel = await connection.channel()
        for queue in (unique, f"{unique}.dlq", f"{unique}.cancelled"):
            await channel.queue_delete(queue)
        await channel.exchange_delete(f"{unique}.dlx")
    finally:
        await connection.close()


@pytest.fixture
async def broker(amqp_url: str) -> AsyncIterator[Broker]:
    async with Broker(amqp_url) as b:
        yield b


@pytest.fixture(params=["rabbitmq", "memory"])
def url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The broker a broker-neutral test runs on: the session vhost, then a fresh memory://
    (which needs no RabbitMQ: the vhost is asked for only in the rabbitmq case)."""
    if request.param == "rabbitmq":
        yield request.getfixturevalue("vhost_url")
        return
    memory = f"memory://{uuid.uuid4().hex}"
    yield memory
    MemoryBroker.forget(memory)
