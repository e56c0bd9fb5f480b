"""Operator polish: `status --json` and `--watch`, and `dlq replay --task/--reason/--id`."""

from __future__ import annotations

import json

import tenacity

from nobs_amqp import Project, Worker
from nobs_amqp.ops import dlq
from nobs_amqp.testing import drain

from ..apps import tasks
from ..support import APP, eventually, run_cli, take_messages


def make(url: str, name: str) -> tuple[Project, Worker]:
    worker = Worker(name, stop=tenacity.stop_after_attempt(1))
    return Project(name="nobs-test", workers=[worker], packages=["tests"], url=url), worker


async def _mixed_dead_letters(project: Project, worker: Worker, name: str) -> dict[str, str]:
    """Two rejected (`reject`), two that ran out of attempts (`always_fail`): message id -> kind."""
    kinds = {}
    for i in range(2):
        kinds[await worker.queue(tasks.reject, tasks.Job(key=f"{name}-r{i}"))] = "rejected"
        kinds[await worker.queue(tasks.always_fail, tasks.Job(key=f"{name}-f{i}"))] = "failed"
    await drain(project, timeout=30)
    return kinds


async def test_replay_picks_by_task_reason_and_id(url: str, name: str) -> None:
    project, worker = make(url, name)
    async with project:
        kinds = await _mixed_dead_letters(project, worker, name)
        failed = [i for i, kind in kinds.items() if kind == "failed"]
        rejected = [i for i, kind in kinds.items() if kind == "rejected"]
        by_task = dlq.matching(task="tests.apps.tasks:always_fail")
        planned: list[int] = []
        assert await dlq.replay(project.session, worker, where=by_task, planned=planned.append) == 2
        assert planned == [2]
        assert sorted(m.message_id for m in await take_messages(project, name, 2)) == sorted(failed)
        assert await dlq.replay(project.session, worker, where=dlq.matching(reason="max_attempts")) == 0
        assert await dlq.replay(project.session, worker, where=dlq.matching(ids=[rejected[1]])) == 1
        [back] = await take_messages(project, name)
        assert back.message_id == rejected[1]
        assert await dlq.count(project.session, worker) == 1


async def test_the_cli_replays_by_reason_and_says_how_many(amqp_url: str, name: str) -> None:
    project, worker = make(amqp_url, name)
    async with project:
        kinds = await _mixed_dead_letters(project, worker, name)
    env = {"NOBS_AMQP_URL": amqp_url, "NOBS_TEST_WORKER": name}
    code, text = await run_cli("--app", APP, "dlq", "replay", name, "--reason", "rejected", env=env)
    assert code == 0, text
    assert "replayed 2 matching message(s)" in text
    async with project:
        back = await take_messages(project, name, 2)
        assert sorted(m.message_id for m in back) == sorted(i for i, k in kinds.items() if k == "rejected")
        assert await dlq.count(project.session, worker) == 2


async def test_status_json_and_watch(amqp_url: str, name: str) -> None:
    project, worker = make(amqp_url, name)
    async with project:
        await worker.queue(tasks.record, tasks.Job(key=name))
    env = {"NOBS_AMQP_URL": amqp_url, "NOBS_TEST_WORKER": name}

    async def mine() -> dict[str, object] | None:  # the management API's counts lag by seconds
        code, text = await run_cli("--app", APP, "status", "--json", env=env)
        assert code == 0, text
        status = json.loads(text.splitlines()[-1])
        assert status["project"] == "nobs-test"
        [row] = [w for w in status["workers"] if w["name"] == name]
        return row if row["ready"] == 1 else None

    row = await eventually(mine, timeout=20, interval=0.5)
    assert row["dead"] == 0 and row["exists"] is True
    code, text = await run_cli(
        "--app", APP, "status", "--json", "--watch", "--interval", "0.2", "--count", "3", env=env
    )
    assert code == 0, text
    assert len([line for line in text.splitlines() if line.startswith("{")]) == 3
    code, text = await run_cli("--app", APP, "status", "--watch", "--interval", "0.2", "--count", "2", env=env)
    assert code == 0, text
    assert text.count("waiting in nobs-test.delay.*") == 2
