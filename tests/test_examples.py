"""The seed example, run as a user runs it: the CLI finds the project and consumes."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from examples.send_email.app import SendEmail, priority_queue, project, send_email
from nobs_amqp import Scheduler
from nobs_amqp.memory import MemoryBroker
from nobs_amqp.testing import drain, use_broker
from nobs_amqp.urls import memory_url

from .support import run_cli, run_demo


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
        "--app", "examples.send_email.app:project", "consume", "priority_queue",
        env={"NOBS_AMQP_URL": "amqp://guest:hunter2@127.0.0.1:1/"},
    )  # fmt: skip
    assert code == 1
    assert "cannot connect to amqp://guest:***@127.0.0.1:1/" in output
    assert "hunter2" not in output


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", [pytest.param("rabbitmq", marks=pytest.mark.rabbitmq), "memory"])
async def test_demo_shows_the_retry_and_the_dead_letter(request: pytest.FixtureRequest, kind: str) -> None:
    # The session vhost only for the rabbitmq case: the memory:// one runs with no broker.
    code, output = await run_demo(request.getfixturevalue("amqp_url") if kind == "rabbitmq" else "memory://")
    assert code == 0, output
    assert "attempt 1 failed (MailboxUnavailableError" in output
    assert "x-nobs-reason: max_attempts" in output
    assert "sent email to later@nordmann.no" in output
    if kind == "rabbitmq":
        assert "priority_queue.dlq -> 'Get messages'" in output
    else:
        assert "running on the in-memory broker" in output


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
