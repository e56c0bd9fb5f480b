"""`dlq replay` while a worker runs: what was in the DLQ when it started is replayed, each once.

The worker fails every replayed message again at once (`Reject`), so the copies land in the
DLQ while the replay is still going; a replay that ran "until the DLQ is empty" took them
back and replayed them over and over (20 dead letters replayed 451 or 1,942 times).
"""

from __future__ import annotations

import pytest

from nobs_amqp import Project, Worker
from nobs_amqp.message import Message, wall_clock
from nobs_amqp.ops import dlq
from nobs_amqp.topology import dead_letter_queue

from ..apps import tasks
from ..cli.test_operations import dead_letters
from ..support import eventually, run_cli, take_messages

FAILED = 20


async def refailed(project: Project, worker: Worker, keys: list[str]) -> None:
    """Wait until the worker ran every key once more and its copy is back in the DLQ."""

    async def settled() -> bool:
        ran_again = all(len(tasks.calls(k)) >= 2 for k in keys)
        return ran_again and await dlq.count(project.session, worker) >= len(keys)

    await eventually(settled, timeout=30)


async def dead_ids(project: Project, worker: Worker) -> list[str]:
    return sorted(m.message_id for m in await dlq.peek(project.session, worker, limit=1000))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("batch", [dlq.REPLAY_BATCH, 5])
async def test_replay_while_the_worker_fails_them_again(
    url: str, name: str, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A small batch makes the replay take several passes, so copies failed again by the
    # worker are in the DLQ while the replay still runs.
    monkeypatch.setattr(dlq, "REPLAY_BATCH", batch)
    worker = Worker(name)
    project = Project(name="nobs-test", workers=[worker], packages=["tests"], url=url)
    async with project:
        keys = await dead_letters(project, worker, FAILED)
        before = await dead_ids(project, worker)
        assert len(set(before)) == FAILED
        progress: list[int] = []
        async with project.consuming(worker):
            moved = await dlq.replay(project.session, worker, progress=progress.append)
            assert moved == FAILED
            await refailed(project, worker, keys)
        assert sum(progress) == FAILED
        assert {k: len(tasks.calls(k)) for k in keys} == dict.fromkeys(keys, 2)  # each ran exactly once more
        assert await dlq.count(project.session, worker) == FAILED
        assert await dead_ids(project, worker) == before


@pytest.mark.timeout(60)
async def test_replay_counts_duplicate_message_ids_one_by_one(url: str, name: str) -> None:
    """Two dead letters with the same message id are two messages: both go back."""
    worker = Worker(name)
    project = Project(name="nobs-test", workers=[worker], packages=["tests"], url=url)
    async with project:
        await project.session.declare(worker, delayed=False)
        for key in ("first", "second"):
            body = f'{{"key": "{name}-{key}"}}'.encode()
            message = Message(body, "tests.apps.tasks:record", "same-id", "nobs-test", wall_clock())
            await project.session.transport.publish("", dead_letter_queue(name), message)
        await eventually(lambda: dlq.count(project.session, worker))
        assert await dlq.replay(project.session, worker) == 2
        replayed = await take_messages(project, name, 2)
        assert sorted(m.body for m in replayed) == sorted(
            f'{{"key": "{name}-{k}"}}'.encode() for k in ("first", "second")
        )
        assert await dlq.count(project.session, worker) == 0


@pytest.mark.timeout(120)
async def test_replay_command_while_the_worker_fails_them_again(amqp_url: str, name: str) -> None:
    worker = Worker(name)
    project = Project(name="nobs-test", workers=[worker], packages=["tests"])
    async with project:
        keys = await dead_letters(project, worker, FAILED)
        before = await dead_ids(project, worker)
        async with project.consuming(worker):
            env = {"NOBS_AMQP_URL": amqp_url, "NOBS_TEST_WORKER": name}
            code, output = await run_cli("--app", "tests.apps.cli_app:project", "dlq", "replay", name, env=env)
            assert code == 0, output
            assert f"replayed {FAILED} message(s) to {name}" in output
            await refailed(project, worker, keys)
        assert {k: len(tasks.calls(k)) for k in keys} == dict.fromkeys(keys, 2)
        assert await dlq.count(project.session, worker) == FAILED
        assert await dead_ids(project, worker) == before
