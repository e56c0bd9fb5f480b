"""What tasks in a real service need: their own context, resources opened once per worker
process (a lifespan), and options of their own. Broker-neutral tests run on RabbitMQ and memory://."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from nobs_amqp import LifespanError, NoTaskContextError, Project, Worker, current_task
from nobs_amqp import message as wire
from nobs_amqp.consumer import Consumer
from nobs_amqp.tasks import options_of
from nobs_amqp.testing import drain

from ..apps import tasks
from ..support import APP, ROOT, eventually, exit_code, output, process, run_cli, take_messages

PROJECT = "nobs-test"


def make(url: str, *names: str, **options: Any) -> tuple[Project, list[Worker]]:
    project_options = {k: options.pop(k) for k in ("worker_lifespan",) if k in options}
    workers = [Worker(name, **options) for name in names]
    return Project(name=PROJECT, workers=workers, packages=["tests"], url=url, **project_options), workers


def key() -> str:
    return uuid.uuid4().hex


class Resources:
    """A lifespan that records when it opened and closed, and what ran in between."""

    def __init__(self, fail: bool = False) -> None:
        self.events: list[str] = []
        self.fail = fail

    @contextlib.asynccontextmanager
    async def __call__(self) -> AsyncIterator[dict[str, Any]]:
        self.events.append("open")
        if self.fail:
            raise ConnectionRefusedError("database at db:5432 refused the connection")
        try:
            yield {"pool": self, "opened": len(self.events)}
        finally:
            self.events.append("close")


def test_outside_a_task_there_is_no_context() -> None:
    with pytest.raises(NoTaskContextError, match="only available inside a task"):
        current_task()


async def test_a_task_sees_its_message_attempt_and_state(url: str, name: str) -> None:
    resources = Resources()
    project, [worker] = make(url, name, lifespan=resources, wait=lambda state: 1)
    k, s = key(), key()
    async with project:
        message_id = await worker.queue(tasks.with_context, tasks.Job(key=k, fail_times=1))
        sync_id = await worker.queue(tasks.with_context_sync, tasks.SyncJob(key=s, numbers=[]))
        await drain(project, timeout=30)
    first, second = tasks.CONTEXTS[k]
    assert (first.message_id, second.message_id) == (message_id, message_id)
    assert (first.attempt, second.attempt) == (1, 2)
    assert first.enqueued_at == second.enqueued_at
    assert first.task == "tests.apps.tasks:with_context"
    assert first.worker == name
    assert first.delivery_count == 0
    assert first.state["pool"] is resources
    [in_thread] = tasks.CONTEXTS[s]  # a sync task, in a thread of its own
    assert in_thread.message_id == sync_id
    assert in_thread.state["pool"] is resources


async def test_a_lifespan_opens_before_the_first_task_and_closes_after_the_last(url: str, name: str) -> None:
    resources = Resources()
    project, [worker] = make(url, name, lifespan=resources)
    keys = [key() for _ in range(5)]
    async with project:
        for k in keys:
            await worker.queue(tasks.record, tasks.Job(key=k, sleep=0.2))
        consumer = Consumer(project.session, worker)
        run = asyncio.create_task(consumer.run())
        await eventually(lambda: all(tasks.calls(k) for k in keys), timeout=15)
        assert resources.events == ["open"]
        consumer.stop()  # as SIGTERM does: drain, then close
        await asyncio.wait_for(run, 30)
    assert resources.events == ["open", "close"]


async def test_a_lifespan_that_fails_to_start_stops_the_worker_before_any_message(url: str, name: str) -> None:
    project, [worker] = make(url, name, lifespan=Resources(fail=True))
    k = key()
    async with project:
        await worker.queue(tasks.record, tasks.Job(key=k))
        with pytest.raises(LifespanError, match="database at db:5432 refused") as raised:
            await asyncio.wait_for(Consumer(project.session, worker).run(), 15)
        assert isinstance(raised.value.__cause__, ConnectionRefusedError)
        assert await project.session.transport.message_count(name) == 1
    assert tasks.calls(k) == []


async def test_a_project_lifespan_is_shared_by_the_workers_of_a_process(url: str, name: str) -> None:
    resources = Resources()
    project, workers = make(url, name, f"{name}-b", worker_lifespan=resources)
    a, b = key(), key()
    try:
        async with project, project.consuming():
            await workers[0].queue(tasks.with_context, tasks.Job(key=a))
            await workers[1].queue(tasks.with_context, tasks.Job(key=b))
            await eventually(lambda: tasks.calls(a) and tasks.calls(b), timeout=15)
        assert resources.events == ["open", "close"]
        assert tasks.CONTEXTS[a][0].state is tasks.CONTEXTS[b][0].state
    finally:
        async with project:
            for queue in (f"{name}-b", f"{name}-b.dlq"):
                with contextlib.suppress(Exception):
                    await project.session.transport.purge(queue)


async def test_a_task_can_set_its_own_retry_policy_and_time_limit(url: str, name: str) -> None:
    project, [worker] = make(url, name, wait=lambda state: 1)  # the worker's default: 5 attempts
    gives_up, slow = key(), key()
    async with project:
        await worker.queue(tasks.gives_up_after_two, tasks.Job(key=gives_up))
        await worker.queue(tasks.has_its_own_time_limit, tasks.Job(key=slow))
        await drain(project, timeout=30)
        dead = {d.task: d for d in await take_messages(project, f"{name}.dlq", 2)}
    assert len(tasks.calls(gives_up)) == 2
    assert dead["tests.apps.tasks:gives_up_after_two"].headers[wire.REASON] == "max_attempts"
    limited = dead["tests.apps.tasks:has_its_own_time_limit"].headers
    assert limited[wire.REASON] == "time_limit"
    assert "0.3 s" in str(limited[wire.ERROR_MESSAGE])
    assert len(tasks.calls(slow)) == 5  # its own time limit, the worker's retry policy


async def test_a_dead_letter_says_why_the_task_asked_for_a_retry(url: str, name: str) -> None:
    project, [worker] = make(url, name, stop=lambda state: state.attempt_number >= 2)
    k = key()
    async with project:
        await worker.queue(tasks.retries_with_a_reason, tasks.Job(key=k))
        await drain(project, timeout=30)
        [dead] = await take_messages(project, f"{name}.dlq")
    assert dead.headers[wire.REASON] == "max_attempts"
    assert f"upstream answered 503 for {k}" in str(dead.headers[wire.ERROR_MESSAGE])


def test_task_options_are_checked_and_keep_the_function() -> None:
    assert options_of(tasks.gives_up_after_two).describe() == (
        "stop=stop_after_attempt(max_attempt_number=2), wait=wait_fixed(wait_fixed=1.0)"
    )
    assert tasks.gives_up_after_two.__name__ == "gives_up_after_two"
    assert not options_of(tasks.record)
    from nobs_amqp import ConfigurationError, TaskDefinitionError, task

    with pytest.raises(ConfigurationError, match="time_limit"):
        task(time_limit=0)
    with pytest.raises(TaskDefinitionError, match="plain function"):
        task(time_limit=1)(print)


async def test_status_lists_the_tasks_with_options_of_their_own(amqp_url: str) -> None:
    code, text = await run_cli("--app", APP, "status", env={"NOBS_AMQP_URL": amqp_url, "NOBS_TEST_WORKER": key()})
    assert code == 0, text
    assert (
        "task tests.apps.tasks:gives_up_after_two: stop=stop_after_attempt(max_attempt_number=2), "
        "wait=wait_fixed(wait_fixed=1.0) (its own, over its worker's)"
    ) in text
    assert "task tests.apps.tasks:has_its_own_time_limit: time_limit=0.3s" in text


@pytest.mark.rabbitmq
@pytest.mark.timeout(60)
async def test_each_process_of_a_cli_worker_runs_its_own_lifespan(amqp_url: str, name: str, tmp_path: Path) -> None:
    project, [worker] = make(amqp_url, name)
    log = tmp_path / "worker.log"
    env = {
        "NOBS_AMQP_URL": amqp_url,
        "NOBS_TEST_WORKER": name,
        "NOBS_TEST_LIFESPAN_DIR": str(tmp_path),
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, "-m", "nobs_amqp", "--app", APP, "consume", name, "--processes", "2", "--prefetch", "1"]
    with process(command, env=env, log=log) as proc:
        await eventually(lambda: output(log).count("consuming") == 2, timeout=20)
        async with project:
            for i in range(20):
                await worker.queue(tasks.lifespan_pid, tasks.FileJob(folder=str(tmp_path), key=f"j{i}"))
        await eventually(lambda: len(_names(tmp_path, "j*.state-*")) == 20, timeout=30)
        opened = _pids(tmp_path, "open")
        assert len(opened) == 2, output(log)
        proc.send_signal(signal.SIGTERM)
        assert await exit_code(proc, log, 20) == 0, output(log)
    closed = _pids(tmp_path, "close")
    assert closed == opened, output(log)
    for ran in _names(tmp_path, "j*.state-*"):  # each task saw the state of its own process's lifespan
        _, state, pid = ran.split(".")
        assert state == f"state-{pid}"


def _names(folder: Path, pattern: str) -> list[str]:
    return sorted(p.name for p in folder.glob(pattern))


def _pids(folder: Path, what: str) -> list[int]:
    """The pids of the `<what>.<pid>` files the lifespan of tests.apps.cli_app left."""
    return [int(name.split(".")[1]) for name in _names(folder, f"{what}.*")]
