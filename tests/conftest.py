"""Every test session gets its own vhost on a real RabbitMQ, made and removed through
the management API; every test gets unique worker names inside it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import aio_pika
import pytest

from nobs_amqp.memory import MemoryBroker

from .support import Broker


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
async def name(request: pytest.FixtureRequest, vhost_url: str) -> AsyncIterator[str]:
    """A queue name unique to this test; its queues are deleted afterwards.

    Every quorum queue holds a few of the broker's file handles (927 with Debian's
    default ulimit of 1024): a suite that kept all of its queues would run out.
    """
    unique = f"{request.node.name[:40].replace('[', '-').replace(']', '')}-{uuid.uuid4().hex[:6]}"
    yield unique
    connection = await aio_pika.connect(vhost_url)
    try:
        channel = await connection.channel()
        for queue in (unique, f"{unique}.dlq"):
            await channel.queue_delete(queue)
        await channel.exchange_delete(f"{unique}.dlx")
    finally:
        await connection.close()


@pytest.fixture
async def broker(amqp_url: str) -> AsyncIterator[Broker]:
    async with Broker(amqp_url) as b:
        yield b


@pytest.fixture(params=["rabbitmq", "memory"])
def url(request: pytest.FixtureRequest, vhost_url: str) -> Iterator[str]:
    """The broker a broker-neutral test runs on: the session vhost, then a fresh memory://."""
    if request.param == "rabbitmq":
        yield vhost_url
        return
    memory = f"memory://{uuid.uuid4().hex}"
    yield memory
    MemoryBroker.forget(memory)
