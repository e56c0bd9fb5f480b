"""The pytest plugin and `drain`, as a user's own test suite would use them."""

from __future__ import annotations

import time

import pytest
import tenacity

from nobs_amqp import Project, Worker
from nobs_amqp.testing import drain
from nobs_amqp.transports.memory import MemoryBroker

from ..apps import tasks
from ..support import take_messages

pytest_plugins = ["pytester"]


async def test_drain_on_memory_runs_delays_and_retries_in_no_time(nobs_amqp_memory: MemoryBroker, name: str) -> None:
    worker = Worker(name, stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_fixed(600))
    project = Project(name="nobs-test", workers=[worker], packages=["tests"])
    later, flaky, failing = f"{name}-later", f"{name}-flaky", f"{name}-failing"
    started = time.monotonic()
    async with project:
        await worker.queue(tasks.record, tasks.Job(key=later), delay=3600)
        await worker.queue(tasks.record, tasks.Job(key=flaky, fail_times=2))
        await worker.queue(tasks.always_fail, tasks.Job(key=failing))
        processed = await drain(project)
        [dead] = await take_messages(project, f"{name}.dlq")
    assert time.monotonic() - started < 5
    assert processed == 1 + 3 + 3
    assert len(tasks.calls(later)) == 1
    assert len(tasks.calls(flaky)) == 3
    assert len(tasks.calls(failing)) == 3
    assert dead.headers["x-nobs-reason"] == "max_attempts"


async def test_memory_clock_advances_on_demand(nobs_amqp_memory: MemoryBroker, name: str) -> None:
    worker = Worker(name)
    project = Project(name="nobs-test", workers=[worker], packages=["tests"])
    async with project:
        await worker.queue(tasks.record, tasks.Job(key=name), delay=300)
        assert await project.session.transport.message_count(name) == 0
        await nobs_amqp_memory.advance(299)
        assert await project.session.transport.message_count(name) == 0
        await nobs_amqp_memory.advance(1)
        assert await project.session.transport.message_count(name) == 1


async def test_drain_on_rabbitmq(nobs_amqp_url: str, name: str) -> None:
    worker = Worker(name, wait=tenacity.wait_fixed(1))
    project = Project(name="nobs-test", workers=[worker], packages=["tests"])
    async with project:
        await worker.queue(tasks.record, tasks.Job(key=name, fail_times=1))
        assert await drain(project, timeout=20) == 2
    assert len(tasks.calls(name)) == 2


USER_PROJECT = """
from pydantic import BaseModel
from nobs_amqp import Project, Worker

emails = Worker("emails")
project = Project(name="userapp", workers=[emails])
SENT = []

class SendEmail(BaseModel):
    email: str

async def send_email(request: SendEmail) -> None:
    SENT.append(request.email)
"""

USER_TEST = """
from nobs_amqp.testing import drain
from userapp.tasks import SENT, SendEmail, emails, project, send_email

async def test_sends(nobs_amqp_memory):
    async with project:
        await emails.queue(send_email, SendEmail(email="ola@nordmann.no"), delay=60)
        await drain(project)
    assert SENT == ["ola@nordmann.no"]

async def test_sends_on_rabbitmq(nobs_amqp_url):
    async with project:
        await emails.queue(send_email, SendEmail(email="kari@nordmann.no"))
        await drain(project)
    assert "kari@nordmann.no" in SENT
"""


@pytest.mark.timeout(120)
def test_a_user_project_tests_its_tasks_with_the_plugin(pytester: pytest.Pytester, vhost_url: str) -> None:
    pytester.makepyfile(**{"userapp/__init__": "", "userapp/tasks": USER_PROJECT, "test_userapp": USER_TEST})
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\nfilterwarnings = error\n"
    )
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_stale_test_vhosts_are_removed(vhost_url: str) -> None:
    from nobs_amqp.management import Management
    from nobs_amqp.pytest_plugin import STALE_SECONDS, VHOST_PREFIX, remove_stale_vhosts

    management = Management(vhost_url)
    now = time.time()
    old = f"{VHOST_PREFIX}{int(now - STALE_SECONDS - 60)}-deadbeef"
    recent = f"{VHOST_PREFIX}{int(now - 60)}-cafebabe"
    for vhost in (old, recent):
        management.create_vhost(vhost)
    try:
        removed = remove_stale_vhosts(management, now=now)
        names = {v["name"] for v in management.list_vhosts()}
        assert old in removed
        assert old not in names
        assert recent in names  # a session that may still be running is left alone
    finally:
        for vhost in (old, recent):
            if vhost in {v["name"] for v in management.list_vhosts()}:
                management.delete_vhost(vhost)
