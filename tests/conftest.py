"""Every test session gets its own vhost on a real RabbitMQ, made and removed through
the management API; every test gets unique worker names inside it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

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
def name(request: pytest.FixtureRequest) -> str:
    """A queue name unique to this test."""
    return f"{request.node.name[:40].replace('[', '-').replace(']', '')}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
async def broker(amqp_url: str) -> AsyncIterator[Broker]:
    async with Broker(amqp_url) as b:
        yield b
