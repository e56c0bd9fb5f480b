"""The seed example, run as a user runs it: the CLI finds the project and consumes."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

import pytest

from examples.send_email.app import SendEmail, priority_queue, project, send_email
from nobs_amqp import Scheduler
from nobs_amqp.management import Management
from nobs_amqp.testing import drain, use_broker
from nobs_amqp.transports.memory import MemoryBroker
from nobs_amqp.urls import memory_url, vhost_of

from ..support import run_cli, run_demo


@pytest.mark.parametrize(
    ("args", "env"),
    [
        ((), {}),  # [tool.nobs-amqp] app in pyproject.toml
        (("--app", "examples.send_email.app:project"), {}),
        ((), {"NOBS_AMQP_APP": "examples.send_email.app:project"}),
    ],
)
async def test_seed_example_through_the_cli(amqp_url: str, args: tuple[str, ...], env: dict[str, str]) -> None:
    async with project:
        await priority_queue.queue(send_email, SendEmail(email="ola@nordmann.no", content="hello"))
    code, output = await run_cli(*args, "consume", "priority_queue", "--burst", env={"NOBS_AMQP_URL": amqp_url, **env})
    assert code == 0, output
    assert "sent email to ola@nordmann.no: hello" in output
    assert "stopped after 1 task(s)" in output


async def test_cli_errors_say_what_to_do(tmp_path: Path) -> None:
    code, output = await run_cli("--app", "examples.send_email.app:project", "consume", "nope", env={})
    assert code == 2
    assert "has no worker 'nope' (workers: priority_queue)" in output
    code, output = await run_cli("--app", "examples.send_email.app:nothing", "consume", "x", env={})
    assert code == 2
    assert "is nothing, not a nobs_amqp Project" in output
    code, output = await run_cli(
        "--app", "examples.send_email.app:project", "consume", "priority_queue", "--start-timeout", "0",
        env={"NOBS_AMQP_URL": "amqp://guest:hunter2@127.0.0.1:1/"},
    )  # fmt: skip
    assert code == 1
    assert "cannot connect to amqp://guest:***@127.0.0.1:1/" in output
    assert "hunter2" not in output


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", [pytest.param("rabbitmq", marks=pytest.mark.rabbitmq), "memory"])
async def test_demo_shows_the_retry_and_the_dead_letter(request: pytest.FixtureRequest, kind: str) -> None:
    """`make demo`'s output; on RabbitMQ it also runs in a vhost of its own, deleted at the end,
    making and leaving nothing where NOBS_AMQP_URL points."""
    if kind == "memory":  # runs with no broker
        code, output = await run_demo("memory://")
        assert code == 0, output
        assert "running on the in-memory broker" in output
    else:
        amqp_url = request.getfixturevalue("amqp_url")
        management = Management(amqp_url)
        before = await _queues(management, vhost_of(amqp_url))
        code, output = await run_demo(amqp_url)
        assert code == 0, output
        assert "priority_queue.dlq -> 'Get messages'" in output
        assert "/#/queues/nobs-amqp-demo-" in output
        assert "demo: deleted its vhost 'nobs-amqp-demo-" in output
        demo_vhosts = [v["name"] for v in management.list_vhosts() if v["name"].startswith("nobs-amqp-demo-")]
        assert not [v for v in demo_vhosts if v in output], output
        assert await _queues(management, vhost_of(amqp_url)) == before
    assert "attempt 1 failed (MailboxUnavailableError" in output
    assert "x-nobs-reason: max_attempts" in output
    assert "sent email to later@nordmann.no" in output


async def _queues(management: Management, vhost: str) -> set[str]:
    return {q["name"] for q in await management.request("GET", f"/api/queues/{quote(vhost, safe='')}")}


async def test_the_daily_digest_runs_once_a_day_at_seven_in_oslo() -> None:
    """The send_email example's schedule, on memory:// with the virtual clock: two days, two digests."""
    url = memory_url(uuid.uuid4().hex)
    started = time.monotonic()
    try:
        with use_broker(project, url):
            async with project:
                scheduler, clock = Scheduler(project), project.session.transport
                end = project.session.now() + timedelta(days=2)
                ran = 0
                while (upcoming := await scheduler.step()) is not None and upcoming < end:
                    await clock.advance((upcoming - project.session.now()).total_seconds())  # type: ignore[attr-defined]
                    ran += await drain(project)
                ran += await drain(project)
    finally:
        MemoryBroker.forget(url)
    assert ran == 2
    assert time.monotonic() - started < 10
