"""The observer hooks metrics, logs and traces are built on: what a worker and a producer tell
them, on RabbitMQ and memory://, and that an observer's bug costs no task."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import tenacity

from nobs_amqp import Project, Worker
from nobs_amqp import message as wire
from nobs_amqp.message import Message
from nobs_amqp.observe.observer import (
    DRAINING,
    READY,
    STOPPED,
    Fate,
    Observer,
    Publish,
    PublishKind,
    TaskRun,
)
from nobs_amqp.testing import drain

from ..apps import tasks
from ..support import take_messages

PROJECT = "nobs-test"


class Recorder(Observer):
    def __init__(self) -> None:
        self.runs: list[TaskRun] = []
        self.published: list[Publish] = []
        self.states: list[str] = []

    @contextlib.contextmanager
    def handling(self, run: TaskRun) -> Iterator[None]:
        yield
        self.runs.append(run)

    @contextlib.contextmanager
    def publishing(self, publish: Publish) -> Iterator[Message]:
        message = publish.message
        yield Message(message.body, message.task, message.message_id, message.app_id, message.timestamp,
                      {**message.headers, "x-observed": "yes"}, message.priority)  # fmt: skip
        self.published.append(publish)

    def consumer_state(self, worker: str, state: str) -> None:
        self.states.append(state)


class Broken(Observer):
    @contextlib.contextmanager
    def handling(self, run: TaskRun) -> Iterator[None]:
        raise RuntimeError("a bug in an observer")
        yield  # pragma: no cover

    def consumer_state(self, worker: str, state: str) -> None:
        raise RuntimeError("another bug")


def key() -> str:
    return uuid.uuid4().hex


async def test_observers_see_every_outcome_and_publish(url: str, name: str) -> None:
    recorder = Recorder()
    worker = Worker(name, stop=tenacity.stop_after_attempt(2), wait=lambda state: 1)
    project = Project(PROJECT, [worker], packages=["tests"], url=url, observers=[Broken(), recorder])
    ok, failing = key(), key()
    async with project:
        ok_id = await worker.queue(tasks.record, tasks.Job(key=ok))
        failing_id = await worker.queue(tasks.always_fail, tasks.Job(key=failing))
        await drain(project, timeout=30)
    assert tasks.calls(ok) and len(tasks.calls(failing)) == 2
    outcomes: dict[str, list[tuple[str, Any]]] = {}
    for run in recorder.runs:
        outcomes.setdefault(run.message_id, []).append((run.outcome, run.reason))
        assert run.known and run.worker == name
    assert outcomes[ok_id] == [(Fate.SUCCEEDED, None)]
    assert outcomes[failing_id] == [(Fate.RETRIED, None), (Fate.DEAD_LETTERED, "max_attempts")]
    failed = [r for r in recorder.runs if r.message_id == failing_id]
    assert all(isinstance(r.error, RuntimeError) and r.seconds >= 0 for r in failed)
    # queue() twice, a retry copy and a dead letter: every publish went through the observer,
    # which was told what each one is and where it goes
    seen = [(p.kind, p.worker, p.exchange, p.routing_key, p.queue, p.delay) for p in recorder.published]
    failing_publishes = [s for s, p in zip(seen, recorder.published, strict=True) if p.message.message_id == failing_id]
    assert failing_publishes[0] == (PublishKind.TASK, name, "", name, name, 0)
    kind, worker_name, exchange, routing_key, queue, delay = failing_publishes[1]
    assert (kind, worker_name, queue, delay) == (PublishKind.RETRY, name, name, 1) and exchange and routing_key
    assert failing_publishes[2] == (PublishKind.DEAD_LETTER, name, f"{name}.dlx", "", f"{name}.dlq", 0)
    assert len(failing_publishes) == 3
    assert (PublishKind.TASK, name, "", name, name, 0) in [
        s for s, p in zip(seen, recorder.published, strict=True) if p.message.message_id == ok_id
    ]
    assert READY in recorder.states and DRAINING in recorder.states and recorder.states[-1] == STOPPED


async def test_a_message_copy_an_observer_yields_is_what_goes_out(url: str, name: str) -> None:
    worker = Worker(name)
    project = Project(PROJECT, [worker], packages=["tests"], url=url, observers=[Recorder()])
    async with project:
        await worker.queue(tasks.record, tasks.Job(key=key()))
        [message] = await take_messages(project, name)
    assert message.headers["x-observed"] == "yes"
    assert message.headers[wire.ATTEMPT] == 1
