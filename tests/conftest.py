"""Every test session gets its own vhost on a real RabbitMQ, made and removed through
the management API; every test gets unique worker names inside it."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

from nobs_amqp.management import Management

from .support import Broker

BASE_URL = os.environ.get("NOBS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def _with_vhost(url: str, vhost: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))


def _broker_answers(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "localhost", parts.port or 5672), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
async def vhost_url() -> AsyncIterator[str]:
    if not _broker_answers(BASE_URL):
        pytest.fail(f"no RabbitMQ answers at {urlsplit(BASE_URL).netloc.rsplit('@', 1)[-1]}: run `make test`")
    management = Management(BASE_URL)
    vhost = f"nobs-test-{uuid.uuid4().hex[:10]}"
    await management.create_vhost(vhost)
    try:
        yield _with_vhost(BASE_URL, vhost)
    finally:
        await management.delete_vhost(vhost)


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
