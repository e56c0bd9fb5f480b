"""Signing: what a key lets a worker refuse, and what a forged or captured message cannot do.

Each test of issue 17's items failed before its fix: a forged copy that made the worker skip
the real message (5), a replay that signed what never verified (6), and captured signed
messages that ran again on another queue or on their own (7).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from nobs_amqp import Project, Worker
from nobs_amqp import message as wire
from nobs_amqp.consumer import Consumer
from nobs_amqp.ops import dlq
from nobs_amqp.signing import Signer
from nobs_amqp.topology import dead_letter_queue

from ..apps import tasks
from ..support import eventually, run_cli, take_messages

PROJECT = "nobs-sign"
TASK = "tests.apps.tasks:record"
KEY_A = "a-signing-key-of-32-characters!!"
KEY_B = "another-signing-key-of-32-chars!"


@pytest.fixture(autouse=True)
def _no_signing_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOBS_AMQP_SIGNING_KEY", raising=False)


def key() -> str:
    return uuid.uuid4().hex


def make(url: str, *names: str, signing_key: Any = KEY_A) -> tuple[Project, list[Worker]]:
    workers = [Worker(name) for name in names]
    project = Project(name=PROJECT, workers=workers, packages=["tests.apps"], url=url, signing_key=signing_key)
    return project, workers


@asynccontextmanager
async def consuming(project: Project, *workers: Worker) -> AsyncIterator[list[Consumer]]:
    async with project.consuming(*workers, grace_period=5) as consumers:
        yield consumers


def job(k: str) -> wire.Message:
    return wire.new_message(tasks.Job(key=k).model_dump_json().encode(), TASK, PROJECT, now=wire.wall_clock())


def signed(k: str, destination: str, signing_key: str = KEY_A) -> wire.Message:
    return Signer([signing_key.encode()]).sign(job(k), destination)


def unsigned_copy(message: wire.Message) -> wire.Message:
    """`message` with its id, attempt and enqueue time, and no signature: what anyone can forge."""
    headers = {h: v for h, v in message.headers.items() if h != wire.SIGNATURE}
    return wire.Message(message.body, message.task, message.message_id, "x", message.timestamp, headers)


async def publish(project: Project, queue: str, message: wire.Message) -> None:
    """Publish `message` as it is (no signing of ours), as anyone with publish rights could."""
    await project.session.transport.publish("", queue, message)


@pytest.mark.timeout(30)
async def test_signed_messages_run_and_unsigned_or_forged_ones_are_dead_lettered(url: str, name: str) -> None:
    project, [worker] = make(url, name)
    k = key()
    async with project, consuming(project, worker):
        await worker.queue(tasks.record, tasks.Job(key=k))
        await eventually(lambda: tasks.calls(k))
        await publish(project, name, job(k))
        await publish(project, name, signed(k, name, KEY_B))
        genuine = signed(k, name)
        tampered = wire.Message(
            tasks.Job(key=k + "x").model_dump_json().encode(),
            genuine.task,
            genuine.message_id,
            "x",
            genuine.timestamp,
            genuine.headers,
        )
        await publish(project, name, tampered)
        # A producer's copy sent again (its first send unconfirmed) carries a mark outside the signature.
        again = key()
        await publish(project, name, wire.resent(signed(again, name)))
        dead = await take_messages(project, f"{name}.dlq", 3)
        await eventually(lambda: tasks.calls(again))
    assert len(tasks.calls(k)) == 1
    assert {d.headers[wire.REASON] for d in dead} == {"bad_signature"}
    assert any("not signed" in str(d.headers[wire.ERROR_MESSAGE]) for d in dead)
    assert KEY_A not in repr(project.signer)


@pytest.mark.timeout(30)
async def test_signing_keys_rotate(url: str, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    old, [worker_old] = make(url, name)
    monkeypatch.setenv("NOBS_AMQP_SIGNING_KEY", f"{KEY_B} {KEY_A}")  # the new key signs, both verify
    new, [worker_new] = make(url, name, signing_key=None)
    a, b = key(), key()
    async with old, new:
        await worker_old.queue(tasks.record, tasks.Job(key=a))  # still in the queue when the fleet rotates
        async with consuming(new, worker_new):
            await worker_new.queue(tasks.record, tasks.Job(key=b))
            await eventually(lambda: tasks.calls(a) and tasks.calls(b))


def test_a_short_signing_key_is_refused() -> None:
    with pytest.raises(Exception, match="at least 16 bytes"):
        Project(name="p", signing_key="short")


# -- item 5: a forged copy must not make the worker skip the real message ------------------------


@pytest.mark.timeout(30)
async def test_a_forged_copy_does_not_make_the_real_message_be_skipped(url: str, name: str) -> None:
    """Before: the unsigned copy was dead-lettered and remembered as settled; the real message,
    sent again by its producer, was then acked unrun and was nowhere."""
    project, [worker] = make(url, name)
    k = key()
    real = signed(k, name)
    async with project, consuming(project, worker):
        await publish(project, name, wire.resent(unsigned_copy(real)))
        [dead] = await take_messages(project, f"{name}.dlq")
        assert dead.headers[wire.REASON] == "bad_signature" and dead.message_id == real.message_id
        await publish(project, name, wire.resent(real))  # its first send's confirm was lost, say
        await eventually(lambda: tasks.calls(k))
    assert len(tasks.calls(k)) == 1


@pytest.mark.timeout(30)
async def test_a_forged_copy_of_a_settled_attempt_is_dead_lettered_not_acked(url: str, name: str) -> None:
    """A forged copy that claims to be sent again is refused for its signature, not taken for a
    duplicate of what ran (acked and gone without a trace)."""
    project, [worker] = make(url, name)
    k = key()
    real = signed(k, name)
    async with project, consuming(project, worker):
        await publish(project, name, real)
        await eventually(lambda: tasks.calls(k))
        await publish(project, name, wire.resent(unsigned_copy(real)))
        [dead] = await take_messages(project, f"{name}.dlq")
    assert dead.headers[wire.REASON] == "bad_signature"
    assert len(tasks.calls(k)) == 1


# -- item 7: captured signed messages --------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_a_signed_message_runs_only_on_the_queue_it_was_signed_for(url: str, name: str) -> None:
    """Before: a task captured from one worker's queue ran on any other queue of the project, and
    a worker's own dead letter published back to its queue ran again."""
    other = f"{name}-b"
    project, [worker, second] = make(url, name, other)
    k, d = key(), key()
    async with project, consuming(project, worker, second):
        await publish(project, other, signed(k, name))  # signed for `name`, sent to `other`
        [dead] = await take_messages(project, f"{other}.dlq")
        assert dead.headers[wire.REASON] == "bad_signature"
        assert "another queue" in str(dead.headers[wire.ERROR_MESSAGE])
        # A dead letter (signed for W.dlq) published straight back to W.
        letter = wire.dead_letter_copy(job(d), wire.Reason.REJECTED, "no", now=wire.wall_clock())
        await publish(project, name, Signer([KEY_A.encode()]).sign(letter, dead_letter_queue(name)))
        [dead] = await take_messages(project, f"{name}.dlq")
        assert dead.headers[wire.REASON] == "bad_signature"
    assert tasks.calls(k) == [] and tasks.calls(d) == []


@pytest.mark.timeout(30)
async def test_a_signed_message_published_again_runs_once_per_worker(
    url: str, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: a captured signed message published again ran again, any number of times."""
    project, [worker] = make(url, name)
    k = key()
    captured = signed(k, name)
    async with project, consuming(project, worker) as [consumer]:
        await publish(project, name, captured)
        await eventually(lambda: tasks.calls(k))
        with caplog.at_level(logging.WARNING, logger="nobs_amqp"):
            for _ in range(3):
                await publish(project, name, captured)
            await eventually(lambda: consumer.duplicates == 3)
    assert len(tasks.calls(k)) == 1
    assert "published again by someone?" in caplog.text


# -- item 6: a replay signs only what verified ----------------------------------------------------


async def unsigned_dead_letter(project: Project, name: str, k: str) -> None:
    await publish(project, name, job(k))
    await eventually(lambda: dlq.count(project.session, project.worker(name)), timeout=15)


@pytest.mark.timeout(40)
async def test_replay_does_not_sign_what_never_verified(url: str, name: str) -> None:
    """Before: `dlq replay` re-signed a message dead-lettered as bad_signature, and it then ran."""
    project, [worker] = make(url, name)
    bad, good = key(), key()
    async with project:
        async with consuming(project, worker):
            await unsigned_dead_letter(project, name, bad)
        await dlq.count(project.session, worker)
        refused: list[int] = []
        moved = await dlq.replay(project.session, worker, unverified=refused.append)
        assert (moved, refused) == (0, [1])
        assert await dlq.count(project.session, worker) == 1
        async with consuming(project, worker):
            await worker.queue(tasks.record, tasks.Job(key=good))  # the worker is up and running
            await eventually(lambda: tasks.calls(good))
        assert tasks.calls(bad) == []
        # Asked for loudly, it replays (and signs) it: then it runs.
        moved = await dlq.replay(project.session, worker, sign_unverified=True)
        assert moved == 1
        async with consuming(project, worker):
            await eventually(lambda: tasks.calls(bad))


@pytest.mark.timeout(60)
async def test_dlq_replay_command_leaves_unverified_dead_letters_and_says_so(
    vhost_url: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    project, [worker] = make(vhost_url, name)
    bad = key()
    async with project, consuming(project, worker):
        await unsigned_dead_letter(project, name, bad)
    env = {"NOBS_AMQP_URL": vhost_url, "NOBS_TEST_WORKER": name, "NOBS_AMQP_SIGNING_KEY": KEY_A}
    code, output = await run_cli("--app", "tests.apps.cli_app:project", "dlq", "replay", name, "--id", "x", env=env)
    assert code == 0, output
    assert "replayed 0" in output
    code, output = await run_cli("--app", "tests.apps.cli_app:project", "dlq", "replay", name, env=env)
    assert code == 0, output
    assert "left 1 dead letter(s)" in output and "--sign-unverified" in output
    async with project:
        assert await dlq.count(project.session, worker) == 1
