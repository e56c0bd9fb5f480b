"""A worker's time limit against the broker's delivery acknowledgement timeout: RabbitMQ 3.11.15
and later take the consumer's own `x-consumer-timeout`, fitted to the time limit; older ones
apply their fixed `consumer_timeout`, and a worker that could outlive it is refused at start.

The suite runs on 3.10 and 4.0, so each pass checks the branch its broker takes."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import quote

import pytest

from nobs_amqp import ConfigurationError, Project, Worker
from nobs_amqp.consumer import Consumer
from nobs_amqp.management import Management
from nobs_amqp.ratelimit import RATE_WAIT_SECONDS
from nobs_amqp.transports.amqp.transport import PER_CONSUMER_TIMEOUT
from nobs_amqp.urls import vhost_of

from ..support import eventually


def make(url: str, name: str, **options: object) -> tuple[Project, Worker]:
    project_options = {k: options.pop(k) for k in ("broker_consumer_timeout",) if k in options}
    worker = Worker(name, **options)  # type: ignore[arg-type]
    return Project("nobs-test", [worker], packages=["tests"], url=url, **project_options), worker  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(consumer: Consumer):  # type: ignore[no-untyped-def]
    run = asyncio.create_task(consumer.run())
    try:
        ready = asyncio.create_task(consumer.ready.wait())
        await asyncio.wait({run, ready}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        if run.done():
            run.result()
        yield
    finally:
        consumer.stop()
        await asyncio.wait_for(run, 30)


async def _consumer_arguments(amqp_url: str, queue: str) -> dict[str, object] | None:
    consumers = await Management(amqp_url).request("GET", f"/api/consumers/{quote(vhost_of(amqp_url), safe='')}")
    for consumer in consumers or []:
        if consumer.get("queue", {}).get("name") == queue:
            return dict(consumer.get("arguments") or {})
    return None


async def _listed(amqp_url: str, queue: str) -> tuple[dict[str, object]] | None:
    arguments = await _consumer_arguments(amqp_url, queue)
    return None if arguments is None else (arguments,)


async def test_a_time_limit_fits_the_brokers_ack_timeout(amqp_url: str, name: str) -> None:
    project, worker = make(amqp_url, name, time_limit=3600, concurrency=2, prefetch=4)
    async with project:
        consumer = Consumer(project.session, worker)
        if project.session.transport.fixed_ack_timeout() is None:  # RabbitMQ 3.11.15+: the consumer's own
            async with running(consumer):
                arguments = await eventually(lambda: _consumer_arguments(amqp_url, name), timeout=15)
            # two deliveries may wait in line for a slot: 2 x 3600 s, plus 60 s to settle
            assert arguments == {"x-consumer-timeout": (2 * 3600 + 60) * 1000}
        else:  # older: the broker's fixed 30 minutes
            with pytest.raises(ConfigurationError, match=r"may wait 7260 s .* consumer timeout of 1800 s"):
                await asyncio.wait_for(consumer.run(), 15)


async def test_a_raised_broker_timeout_is_taken_at_its_word(amqp_url: str, name: str) -> None:
    project, worker = make(amqp_url, name, time_limit=3600, broker_consumer_timeout=4 * 3600)
    async with project, running(Consumer(project.session, worker)):
        pass


async def test_without_a_time_limit_the_broker_default_applies(amqp_url: str, name: str) -> None:
    project, worker = make(amqp_url, name)
    async with project, running(Consumer(project.session, worker)):
        found = await eventually(lambda: _listed(amqp_url, name), timeout=15)
    assert found == ({},)  # the consumer is there, with no timeout of its own


async def test_memory_has_no_ack_timeout(name: str) -> None:
    project, worker = make(f"memory://{name}", name, time_limit=3600)
    async with project, running(Consumer(project.session, worker)):
        assert project.session.transport.fixed_ack_timeout() is None


async def test_the_refusal_names_the_version_that_takes_a_consumers_own_timeout(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 17: the refusal said 3.12 while the worker sets `x-consumer-timeout` from 3.11.15 on
    (`amqp.PER_CONSUMER_TIMEOUT`). Any broker with a fixed timeout (memory:// made to act as one)."""
    project, worker = make(f"memory://{name}", name, time_limit=3600)
    async with project:
        monkeypatch.setattr(project.session.transport, "fixed_ack_timeout", lambda: 1800.0)
        with pytest.raises(ConfigurationError, match="consumer timeout of 1800 s") as refused:
            await asyncio.wait_for(Consumer(project.session, worker).run(), 15)
    version = ".".join(str(part) for part in PER_CONSUMER_TIMEOUT)
    assert f"or use RabbitMQ {version} or newer, where the worker sets its own" in str(refused.value)
    assert "3.12" not in str(refused.value)


async def test_a_rate_limit_adds_its_longest_wait_to_the_ack_timeout(amqp_url: str, name: str) -> None:
    """A delivery may wait up to RATE_WAIT_SECONDS for its permit before its task runs."""
    project, worker = make(amqp_url, name, time_limit=60, concurrency=2, prefetch=4, rate_limit="10/s")
    async with project:
        consumer = Consumer(project.session, worker)
        # two deliveries may wait in line for a slot: 2 x (600 s for a permit + 60 s to run), plus 60 s
        assert consumer._fitting_ack_timeout(project.session.tasks()) == 2 * (RATE_WAIT_SECONDS + 60) + 60
        async with running(consumer):  # within the fixed 30 minutes of a broker older than 3.11.15
            if project.session.transport.fixed_ack_timeout() is None:
                arguments = await eventually(lambda: _consumer_arguments(amqp_url, name), timeout=15)
                assert arguments == {"x-consumer-timeout": int(2 * (RATE_WAIT_SECONDS + 60) + 60) * 1000}
