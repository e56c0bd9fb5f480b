"""The operator commands: dlq, status, enqueue and topology (library on both brokers, CLI on RabbitMQ)."""

from __future__ import annotations

import json
from pathlib import Path

from nobs_amqp import Project, Worker
from nobs_amqp import message as wire
from nobs_amqp.ops import dlq
from nobs_amqp.testing import drain

from ..apps import tasks
from ..support import run_cli, take_messages

ROOT = Path(__file__).resolve().parents[2]


async def dead_letters(project: Project, worker: Worker, n: int) -> list[str]:
    keys = [f"{worker.name}-{i}" for i in range(n)]
    for k in keys:
        await worker.queue(tasks.reject, tasks.Job(key=k))
    await drain(project, worker, timeout=30)
    return keys


async def test_peek_replay_purge(url: str, name: str) -> None:
    worker = Worker(name)
    project = Project(name="nobs-test", workers=[worker], packages=["tests"], url=url)
    async with project:
        keys = await dead_letters(project, worker, 5)
        peeked = await dlq.peek(project.session, worker, limit=3)
        assert [m.headers[wire.REASON] for m in peeked] == ["rejected"] * 3
        assert len({m.message_id for m in peeked}) == 3
        assert all(any(f'"{k}"'.encode() in m.body for k in keys) for m in peeked)
        assert await dlq.count(project.session, worker) == 5  # peeking leaves them there

        progress: list[int] = []
        assert await dlq.replay(project.session, worker, limit=2, progress=progress.append) == 2
        assert sum(progress) == 2
        assert await dlq.count(project.session, worker) == 3
        replayed = await take_messages(project, name, 2)
        assert all(m.attempt == 1 for m in replayed)
        assert all(wire.REASON not in m.headers and "x-death" not in m.headers for m in replayed)
        assert {m.message_id for m in replayed} <= {m.message_id for m in peeked}

        assert await dlq.purge(project.session, worker) == 3
        assert await dlq.count(project.session, worker) == 0
        assert await dlq.peek(project.session, worker) == []


async def cli(*args: str, url: str, worker: str, stdin: bytes = b"", cancellable: bool = False) -> tuple[int, str]:
    env = {"NOBS_AMQP_URL": url, "NOBS_TEST_WORKER": worker, "NOBS_TEST_CANCELLABLE": "1" if cancellable else ""}
    return await run_cli("--app", "tests.apps.cli_app:project", *args, env=env, stdin=stdin)


async def test_dlq_commands(amqp_url: str, name: str) -> None:
    worker = Worker(name)
    project = Project(name="nobs-test", workers=[worker], packages=["tests"])
    async with project:
        await dead_letters(project, worker, 3)
        [first] = await dlq.peek(project.session, worker, limit=1)

    code, output = await cli("dlq", "list", name, url=amqp_url, worker=name)
    assert code == 0, output
    assert output.count("rejected") == 3
    assert "this payload is not for us" in output
    assert "3 dead letter(s) shown" in output

    code, output = await cli("dlq", "show", name, first.message_id, url=amqp_url, worker=name)
    assert code == 0, output
    assert "x-nobs-traceback:" in output
    assert first.body.decode() in output

    code, output = await cli("dlq", "replay", name, url=amqp_url, worker=name)
    assert code == 0, output
    assert f"replayed 3 message(s) to {name}" in output

    code, output = await cli("dlq", "purge", name, url=amqp_url, worker=name)
    assert code == 0, output  # empty after the replay: it says so and asks nothing
    assert f"nothing to purge: {name}.dlq is empty" in output
    async with project:
        assert await project.session.transport.message_count(name) == 3


async def test_status_and_enqueue_commands(amqp_url: str, name: str) -> None:
    code, output = await cli(
        "enqueue", name, "tests.apps.tasks:record", '{"key": "by-hand"}', url=amqp_url, worker=name
    )
    assert code == 0, output
    message_id = output.strip().splitlines()[-1]
    assert len(message_id) == 32

    code, output = await cli("enqueue", name, "os:system", '"touch /tmp/x"', url=amqp_url, worker=name)
    assert code == 2
    assert "outside the project's tasks; nothing was imported" in output
    code, output = await cli("enqueue", name, "tests.apps.tasks:record", '{"key": 5}', url=amqp_url, worker=name)
    assert code == 2
    assert "payload does not fit tests.apps.tasks:record" in output

    code, output = await cli("status", url=amqp_url, worker=name)
    assert code == 0, output
    assert name in output
    assert "waiting in nobs-test.delay.*" in output
    project = Project(name="nobs-test", workers=[Worker(name)], packages=["tests"])
    async with project:
        [queued] = await take_messages(project, name)
    assert queued.message_id == message_id
    assert queued.body == b'{"key":"by-hand","fail_times":0,"sleep":0.0}'


async def test_topology_commands(amqp_url: str, name: str) -> None:
    code, output = await cli("topology", "diff", url=amqp_url, worker=name)
    assert code == 1
    assert f"missing queue {name}\n" in output
    assert f"missing queue {name}.dlq" in output

    code, output = await cli("topology", "apply", url=amqp_url, worker=name)
    assert code == 0, output
    code, output = await cli("topology", "diff", url=amqp_url, worker=name)
    assert code == 0, output
    assert "the broker has everything" in output

    code, output = await cli("topology", "export", url=amqp_url, worker=name)
    assert code == 0, output
    exported = json.loads(output)
    [queue] = [q for q in exported["queues"] if q["name"] == name]
    assert queue["arguments"]["x-queue-type"] == "quorum"
    assert queue["arguments"]["x-dead-letter-exchange"] == f"{name}.dlx"
    assert len([q for q in exported["queues"] if q["name"].startswith("nobs-test.delay.")]) == 29
    assert {"source": f"{name}.dlx", "destination": f"{name}.dlq"}.items() <= next(
        b for b in exported["bindings"] if b["source"] == f"{name}.dlx"
    ).items()

    code, output = await cli("topology", "show", url=amqp_url, worker=name)
    assert code == 0, output
    assert f"queue    {name} " in output


async def test_enqueue_with_an_id_and_an_expiry_then_cancel_it(amqp_url: str, name: str) -> None:
    job = f'{{"key": "{name}"}}'
    code, output = await cli(
        "enqueue",
        name,
        "tests.apps.tasks:record",
        job,
        "--id",
        f"{name}-1",
        "--expires",
        "600",
        url=amqp_url,
        worker=name,
        cancellable=True,
    )
    assert code == 0, output
    assert output.strip().splitlines()[-1] == f"{name}-1"
    code, output = await cli("cancel", name, f"{name}-1", url=amqp_url, worker=name)
    assert code == 2 and "takes no cancellations" in output  # not a cancellable worker in that process
    code, output = await cli("cancel", name, f"{name}-1", url=amqp_url, worker=name, cancellable=True)
    assert code == 0, output
    assert f"cancelled 1 id(s) on {name}" in output

    worker = Worker(name, cancellable=True)
    project = Project(name="nobs-test", workers=[worker], packages=["tests"])
    async with project:
        await drain(project, worker, timeout=30)
        [dead] = await take_messages(project, f"{name}.dlq")
    assert dead.message_id == f"{name}-1"
    assert dead.headers[wire.REASON] == "cancelled"
    assert wire.EXPIRES in dead.headers
    assert tasks.calls(name) == []
