"""Rate limits across real worker processes (`nobs-amqp consume`), and SIGTERM while tasks wait."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nobs_amqp import Project, Worker

from ..apps import tasks
from ..apps.rate_tasks import most_in_a_window
from ..support import APP, ROOT, Broker, count_is, eventually, exit_code, process, take_messages

#: A start is stamped in the task, a little after the broker granted its permit.
CLOCK_SLACK = 0.05


def worker_with_a_limit(
    amqp_url: str, name: str, log: Path, rate_limit: str
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    env = {
        "NOBS_AMQP_URL": amqp_url,
        "NOBS_TEST_WORKER": name,
        "NOBS_TEST_RATE_LIMIT": rate_limit,
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, "-m", "nobs_amqp", "--app", APP, "consume", name]
    return process(command, env=env, log=log, new_session=False)


def starts(folder: Path) -> dict[str, tuple[int, float]]:
    """Each key's start: (pid, time), from the files `tasks.slow_file` leaves."""
    found = {}
    for path in folder.glob("*.start.*"):
        key, _, pid = path.name.split(".")
        found[key] = (int(pid), float(path.read_text()))
    return found


@contextlib.contextmanager
def both(
    first: contextlib.AbstractContextManager[subprocess.Popen[bytes]],
    second: contextlib.AbstractContextManager[subprocess.Popen[bytes]],
) -> Iterator[tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]]:
    with first as one, second as two:
        yield one, two


@pytest.mark.timeout(60)
async def test_two_worker_processes_share_one_limit(amqp_url: str, name: str, broker: Broker, tmp_path: Path) -> None:
    worker = Worker(name)
    async with Project(name="nobs-test", workers=[worker], packages=["tests.apps"], url=amqp_url):
        await worker.queue_many(tasks.slow_file, [tasks.FileJob(folder=str(tmp_path), key=f"k{i}") for i in range(30)])
    with both(
        worker_with_a_limit(amqp_url, name, tmp_path / "a.log", "5/s"),
        worker_with_a_limit(amqp_url, name, tmp_path / "b.log", "5/s"),
    ) as (one, two):
        await eventually(lambda: len(starts(tmp_path)) == 30, timeout=30, interval=0.1)
        for proc in (one, two):
            proc.send_signal(signal.SIGTERM)
        for proc, log in ((one, tmp_path / "a.log"), (two, tmp_path / "b.log")):
            assert await exit_code(proc, log, 30) == 0
    found = starts(tmp_path)
    assert {pid for pid, _ in found.values()} == {one.pid, two.pid}  # both processes ran some
    assert most_in_a_window([t for _, t in found.values()], 1.0 - CLOCK_SLACK) <= 5
    assert await broker.count(name) == 0
    assert await broker.count(f"{name}.dlq") == 0


@pytest.mark.timeout(60)
async def test_sigterm_while_tasks_wait_gives_them_back_unrun(
    amqp_url: str, name: str, broker: Broker, tmp_path: Path
) -> None:
    worker = Worker(name)
    project = Project(name="nobs-test", workers=[worker], packages=["tests.apps"], url=amqp_url)
    async with project:
        await worker.queue_many(tasks.slow_file, [tasks.FileJob(folder=str(tmp_path), key=f"k{i}") for i in range(3)])
        log = tmp_path / "worker.log"
        with worker_with_a_limit(amqp_url, name, log, "1/m") as proc:
            await eventually(lambda: len(starts(tmp_path)) == 1, timeout=20, interval=0.1)
            await eventually(lambda: count_is(broker, name, 0))  # the other two are held: they wait for a permit
            proc.send_signal(signal.SIGTERM)
            assert await exit_code(proc, log, 30) == 0
        assert len(starts(tmp_path)) == 1
        assert await broker.count(f"{name}.dlq") == 0
        back = await take_messages(project, name, 2)
    assert [message.attempt for message in back] == [1, 1]  # not counted as an attempt
