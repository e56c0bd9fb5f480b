"""pytest fixtures for projects that use nobs_amqp (loaded automatically once installed).

- `nobs_amqp_vhost` (session): a fresh vhost on a real RabbitMQ, made and removed through
  the management API; its URL. Skipped when no broker answers, failed instead when the
  `CI` environment variable is set.
- `nobs_amqp_url`: that vhost, also set as NOBS_AMQP_URL so your Project uses it.
- `nobs_amqp_memory`: NOBS_AMQP_URL set to a fresh `memory://` broker, which it yields.

Then `await nobs_amqp.testing.drain(project)` runs what your code queued. A project built with
an explicit `Project(url=...)` ignores NOBS_AMQP_URL: point it at the fixture's broker with
`with nobs_amqp.testing.use_broker(project): ...` (an autouse fixture does it for every test).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator

import pytest

from .errors import ConfigurationError, NobsAmqpError
from .management import Management
from .project import DEFAULT_URL, URL_ENV
from .transports.memory import MemoryBroker
from .urls import broker_urls, in_process, memory_url, parse, with_vhost


def _answers(url: str) -> bool:
    parts = parse(url)
    try:
        with socket.create_connection((parts.host, parts.port), timeout=2):
            return True
    except OSError:
        return False


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this fails instead of skipping)")
    pytest.skip(reason)


VHOST_PREFIX = "nobs-amqp-test-"
STALE_SECONDS = 6 * 3600


def remove_stale_vhosts(management: Management, now: float | None = None) -> list[str]:
    """Delete test vhosts older than STALE_SECONDS: left by sessions that were killed.
    Their quorum queues hold the broker's file handles until someone does."""
    now = time.time() if now is None else now
    stale = []
    for entry in management.list_vhosts():
        name = entry.get("name", "")
        created = name.removeprefix(VHOST_PREFIX).split("-", 1)[0]
        if name.startswith(VHOST_PREFIX) and created.isdigit() and now - int(created) > STALE_SECONDS:
            management.delete_vhost(name)
            stale.append(name)
    return stale


@pytest.fixture(scope="session")
def nobs_amqp_vhost() -> Iterator[str]:
    """The URL of a vhost made for this test session on the broker at NOBS_AMQP_URL."""
    try:
        base = broker_urls(os.environ.get(URL_ENV) or DEFAULT_URL, URL_ENV)[0]
        if in_process(base):
            _unavailable("NOBS_AMQP_URL is memory://: nobs_amqp_vhost needs a RabbitMQ")
        management = Management(base)
    except ConfigurationError as exc:
        pytest.fail(f"cannot make a test vhost: {exc}", pytrace=False)
    if not _answers(base):
        _unavailable(f"no RabbitMQ answers at {parse(base).address} (set NOBS_AMQP_URL)")
    vhost = f"{VHOST_PREFIX}{int(time.time())}-{uuid.uuid4().hex[:8]}"
    try:
        remove_stale_vhosts(management)
        management.create_vhost(vhost)
    except NobsAmqpError as exc:
        _unavailable(f"cannot create a test vhost through the management API: {exc}")
    try:
        yield with_vhost(base, vhost)
    finally:
        management.delete_vhost(vhost)


@pytest.fixture
def nobs_amqp_url(nobs_amqp_vhost: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The session's vhost URL, set as NOBS_AMQP_URL for the code under test."""
    monkeypatch.setenv(URL_ENV, nobs_amqp_vhost)
    return nobs_amqp_vhost


@pytest.fixture
def nobs_amqp_memory(monkeypatch: pytest.MonkeyPatch) -> Iterator[MemoryBroker]:
    """A fresh in-memory broker, set as NOBS_AMQP_URL for the code under test."""
    url = memory_url(uuid.uuid4().hex)
    monkeypatch.setenv(URL_ENV, url)
    yield MemoryBroker.named(url)
    MemoryBroker.forget(url)
