"""Results, groups and chains (issue 19 items 2 and 8), on RabbitMQ and on memory://."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from tenacity import stop_after_attempt, wait_fixed, wait_none

from nobs_amqp import Project, Worker
from nobs_amqp import Step as PublicStep
from nobs_amqp import gather_results as public_gather_results
from nobs_amqp import message as wire
from nobs_amqp.chains import Step
from nobs_amqp.consumer import consuming
from nobs_amqp.errors import (
    BrokerUnavailableError,
    ChainError,
    PayloadTypeError,
    ResultLostError,
    ResultNotRequestedError,
    ResultTimeoutError,
    ResultUnreadableError,
    TaskFailedError,
)
from nobs_amqp.handle import Queued, gather_results
from nobs_amqp.testing import drain
from nobs_amqp.topology import dead_letter_queue
from nobs_amqp.transports.memory import MemoryBroker, MemoryTransport

from ..apps import results_tasks as t
from ..support import eventually, take_messages

PROJECT = "nobs-results"
KEY = "a-signing-key-of-32-bytes-at-least"


def make(url: str, *names: str, **options: Any) -> tuple[Project, list[Worker]]:
    signing = options.pop("signing_key", None)
    options.setdefault("wait", wait_none())
    workers = [Worker(n, stop=stop_after_attempt(3), **options) for n in names]
    return Project(name=PROJECT, workers=workers, packages=["tests"], url=url, signing_key=signing), workers


def key() -> str:
    return uuid.uuid4().hex


@contextlib.asynccontextmanager
async def worker_process(url: str, *names: str, **options: Any) -> AsyncIterator[Project]:
    """Another connection consuming `names`, as a worker process would."""
    project, workers = make(url, *names, **options)
    async with project, consuming(project.session, workers):
        yield project


async def test_a_result_is_the_return_value_typed_by_the_annotation(url: str, name: str) -> None:
    project, [worker] = make(url, name)
    async with project:
        handle = await worker.queue(t.add, t.Pair(a=2, b=3), result=True)
        in_thread = await worker.queue(t.add_sync, t.Pair(a=4, b=5), result=True)
        plain = await worker.queue(t.untyped, t.Number(value=7), result=True)
        assert isinstance(handle, Queued) and isinstance(handle, str)
        assert handle == handle.message_id and handle.worker == name
        await drain(project)
        assert await handle.result(timeout=10) == t.Total(total=5, attempts=1)
        assert await in_thread.result(timeout=10) == 9
        assert await plain.result(timeout=10) == {"value": 7, "list": [1, 2]}
        assert len(project.session.results) == 0


async def test_a_failure_is_raised_typed_after_its_retries(url: str, name: str) -> None:
    project, [worker] = make(url, name)
    k = key()
    async with project:
        failing = await worker.queue(t.always_fails, t.Number(value=7, key=k), result=True)
        rejected = await worker.queue(t.rejects, t.Number(value=8), result=True)
        await drain(project)
        with pytest.raises(TaskFailedError) as raised:
            await failing.result(timeout=10)
        with pytest.raises(TaskFailedError) as refused:
            await rejected.result(timeout=10)
    assert t.ATTEMPTS[k] == 3
    error = raised.value
    assert (error.reason, error.error_type, error.error_message) == ("max_attempts", "builtins.ValueError", "boom 7")
    assert error.message_id == failing and error.task == "tests.apps.results_tasks:always_fails"
    assert "always_fails" in str(error) and "max_attempts" in str(error) and "boom 7" in str(error)
    assert refused.value.reason == "rejected" and refused.value.error_message == "no 8"


@pytest.mark.parametrize("through_ladder", [False, True], ids=["at-once", "delay-ladder"])
async def test_a_retried_tasks_result_comes_after_its_retry(url: str, name: str, through_ladder: bool) -> None:
    """The retry copy carries the reply address and id (through the delay ladder too)."""
    project, [worker] = make(url, name, **({"wait": wait_fixed(1)} if through_ladder else {}))
    k = key()
    async with project:
        handle = await worker.queue(t.plus_one, t.Number(value=1, key=k, fail_times=2), result=True)
        await drain(project)
        assert await handle.result(timeout=10) == t.Number(value=2, key=k)
    assert t.ATTEMPTS[k] == 3


async def test_result_times_out_with_a_typed_error(url: str, name: str) -> None:
    project, [worker] = make(url, name)
    async with project:
        handle = await worker.queue(t.add, t.Pair(a=1, b=1), result=True)
        with pytest.raises(ResultTimeoutError) as raised:
            await handle.result(timeout=0.2)
        assert isinstance(raised.value, TimeoutError)
        assert len(project.session.results) == 0, "a result nobody waits for is forgotten"
        with pytest.raises(ResultLostError, match="timed out or was cancelled"):
            await handle.result(timeout=0.2)
        cancelled = await worker.queue(t.add, t.Pair(a=1, b=1), result=True)
        waiting = asyncio.ensure_future(cancelled.result(timeout=None))
        await asyncio.sleep(0)  # it waits
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert len(project.session.results) == 0, "a cancelled result() is forgotten too"
        await drain(project)  # its reply comes for no one: dropped


async def test_result_without_asking_says_to_pass_result_true(url: str, name: str) -> None:
    project, [worker] = make(url, name)
    async with project:
        handle = await worker.queue(t.add, t.Pair(a=1, b=1))
        [many] = await worker.queue_many(t.add, [t.Pair(a=1, b=2)])
        assert isinstance(many, Queued)
        for each in (handle, many):
            with pytest.raises(ResultNotRequestedError, match="pass result=True"):
                await each.result(timeout=1)
        messages = await take_messages(project, name, 2)
    assert all(wire.REPLY not in m.headers and m.reply_to is None for m in messages)


async def test_a_result_that_is_not_json_is_a_typed_error_and_the_task_succeeded(url: str, name: str) -> None:
    project, [worker] = make(url, name)
    async with project:
        handle = await worker.queue(t.unserializable, t.Number(value=1), result=True)
        await drain(project)
        with pytest.raises(ResultUnreadableError, match="not JSON"):
            await handle.result(timeout=10)
        assert await project.session.transport.message_count(dead_letter_queue(name)) == 0


async def test_results_are_signed_when_signing(url: str, name: str) -> None:
    project, [worker] = make(url, name, signing_key=KEY)
    async with project:
        handle = await worker.queue(t.add, t.Pair(a=20, b=22), result=True)
        await drain(project)
        assert (await handle.result(timeout=10)).total == 42


async def test_a_group_of_ten_across_two_workers(url: str, name: str) -> None:
    first, second = name, f"{name}-b"
    caller, [one, two] = make(url, first, second)
    async with caller, worker_process(url, first, second):
        handles = await one.queue_many(t.double, [t.Number(value=i) for i in range(5)], result=True)
        handles += await two.queue_many(t.plus_one, [t.Number(value=i) for i in range(5, 10)], result=True)
        results = await gather_results(handles, timeout=20)
        assert [r.value for r in results] == [0, 2, 4, 6, 8, 6, 7, 8, 9, 10]
        failing = [*handles[:2], await two.queue(t.rejects, t.Number(value=3), result=True)]
        with pytest.raises(TaskFailedError):
            await gather_results(failing, timeout=20)
        mixed = await gather_results(failing, timeout=20, return_exceptions=True)
        assert [type(r).__name__ for r in mixed] == ["Number", "Number", "TaskFailedError"]
        assert len(caller.session.results) == 0


async def test_a_chain_of_three_gives_the_last_steps_result(url: str, name: str) -> None:
    first, second = name, f"{name}-b"
    caller, [one, two] = make(url, first, second)
    async with caller, worker_process(url, first, second):
        chained = await one.queue(
            t.plus_one, t.Number(value=1), then=[Step(two, t.double), Step(one, t.plus_one)], result=True
        )
        assert await chained.result(timeout=20) == t.Number(value=5)  # (1 + 1) * 2 + 1
        given = await one.queue(t.plus_one, t.Number(value=1), then=[Step(two, t.add, t.Pair(a=1, b=2))], result=True)
        assert await given.result(timeout=20) == t.Total(total=3, attempts=1)
        k = key()
        unawaited = await one.queue(
            t.plus_one, t.Number(value=1), then=[Step(two, t.plus_one, t.Number(value=0, key=k))]
        )
        assert isinstance(unawaited, Queued)
        with pytest.raises(ResultNotRequestedError):
            await unawaited.result(timeout=1)
        await eventually(lambda: t.ATTEMPTS[k] == 1, timeout=20)  # a chain runs without a caller waiting


async def test_a_chain_stops_where_a_step_fails_for_good(url: str, name: str) -> None:
    first, second = name, f"{name}-b"
    caller, [one, two] = make(url, first, second)
    k, last = key(), key()
    async with caller:
        chained = await one.queue(
            t.plus_one,
            t.Number(value=1),
            then=[
                Step(two, t.always_fails, t.Number(value=9, key=k)),
                Step(one, t.plus_one, t.Number(value=0, key=last)),
            ],
            result=True,
        )
        await drain(caller)
        with pytest.raises(TaskFailedError) as raised:
            await chained.result(timeout=10)
        [dead] = await take_messages(caller, dead_letter_queue(second))
    error = raised.value
    assert error.step == "2 of 3" and error.reason == "max_attempts" and "step 2 of 3" in str(error)
    assert t.ATTEMPTS[k] == 3 and t.ATTEMPTS[last] == 0, "the step after the failed one never ran"
    assert wire.CHAIN in dead.headers and "plus_one" in str(dead.headers[wire.CHAIN])


async def test_a_chain_is_checked_at_the_call_site(url: str, name: str) -> None:
    project, [worker] = make(url, name)
    stranger = Worker(f"{name}-x")
    async with project:
        await project.session.declare(worker, delayed=False)
        with pytest.raises(PayloadTypeError):
            await worker.queue(t.plus_one, t.Number(value=1), then=[Step(worker, t.double, t.Pair(a=1, b=2))])
        with pytest.raises(ChainError, match="not one of the project's workers"):
            await worker.queue(t.plus_one, t.Number(value=1), then=[Step(stranger, t.double)])
        assert await project.session.transport.message_count(name) == 0


async def test_a_signed_chain_runs_and_replies(url: str, name: str) -> None:
    first, second = name, f"{name}-b"
    caller, [one, two] = make(url, first, second, signing_key=KEY)
    assert (PublicStep, public_gather_results) == (Step, gather_results)
    async with caller, worker_process(url, first, second, signing_key=KEY):
        chained = await one.queue(t.plus_one, t.Number(value=3), then=[Step(two, t.double)], result=True)
        assert (await chained.result(timeout=20)).value == 8


async def test_a_next_step_its_worker_cannot_queue_fails_the_chains_result(url: str, name: str) -> None:
    """The worker that ran step 1 queues step 2 only to a worker of its own project: here it has
    none of that name; step 1 succeeded (acked), the caller is told the chain failed."""
    first, second = name, f"{name}-b"
    caller, [one, two] = make(url, first, second)
    async with caller, worker_process(url, first):
        chained = await one.queue(t.plus_one, t.Number(value=1), then=[Step(two, t.double)], result=True)
        with pytest.raises(TaskFailedError) as raised:
            await chained.result(timeout=20)
        assert await caller.session.transport.message_count(dead_letter_queue(first)) == 0
    assert raised.value.reason == "chain_failed" and "step 2 of 2" in str(raised.value)
    assert f"no worker {second!r}" in str(raised.value)


async def test_a_chain_header_never_runs_what_the_worker_does_not_allow(url: str, name: str) -> None:
    """A hostile chain header (unsigned project) naming `os:system`: the next worker refuses it as
    unknown_task, as it refuses any message; the caller awaiting it is told so."""
    project, [worker] = make(url, name)
    async with project:
        session = project.session
        await session.declare(worker, delayed=False)
        chain = {"step": 1, "of": 2, "next": [{"worker": name, "task": "os:system", "body": '"touch /tmp/x"'}]}
        message = wire.new_message(b'{"value": 1}', "tests.apps.results_tasks:plus_one", PROJECT, now=session.now())
        headers = {**message.headers, wire.CHAIN: orjson.dumps(chain).decode(), wire.REPLY: message.message_id}
        waiting = session.results.expect(message.message_id)
        await session.send(worker, replace(message, headers=headers), 0, reply=True)
        await drain(project)
        [dead] = await take_messages(project, dead_letter_queue(name))
        reply = await asyncio.wait_for(waiting, 10)
    assert dead.task == "os:system" and dead.headers[wire.REASON] == "unknown_task"
    assert reply.headers["x-nobs-reason"] == "unknown_task" and reply.headers["x-nobs-step"] == "2 of 2"


async def test_the_readme_example_runs(url: str, name: str, tmp_path: Path) -> None:
    """The README's "Results, groups and chains" example, as a user's two files, on either broker."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("## Results, groups and chains") :]
    package, main = (tmp_path / "myapp", tmp_path / "main.py")
    package.mkdir()
    (package / "__init__.py").write_text("")
    for target, marker in ((package / "maths.py", "# myapp/maths.py"), (main, "# main.py")):
        start = section.index(marker)
        target.write_text(section[start : section.index("```", start)])
    (package / "maths.py").write_text((package / "maths.py").read_text().replace('"maths"', f'"{name}"'))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(main),
        cwd=tmp_path,
        env={**os.environ, "NOBS_AMQP_URL": url, "PYTHONPATH": str(tmp_path)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 50)
    assert process.returncode == 0, output.decode()
    assert output.decode().split("\n")[:3] == ["total=3", "[0, 2, 4, 6, 8, 10, 12, 14, 16, 18]", "6"]


async def test_a_next_step_the_broker_did_not_take_runs_its_step_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Like a retry copy, the next step is confirmed before the ack: when the broker is
    unreachable, the delivery goes back, its step runs again and queues the next one then."""
    url = f"memory://{key()}"
    first, second = "chain-first", "chain-second"
    caller, [one, two] = make(url, first, second)
    refused: list[str] = []
    publish = MemoryTransport.publish

    async def unreachable_once(self: MemoryTransport, exchange: str, routing_key: str, message: wire.Message) -> None:
        if routing_key == second and not refused:
            refused.append(message.message_id)
            raise BrokerUnavailableError(second, "the broker is unreachable (a test)")
        await publish(self, exchange, routing_key, message)

    monkeypatch.setattr(MemoryTransport, "publish", unreachable_once)
    k = key()
    try:
        async with caller:
            chained = await one.queue(t.plus_one, t.Number(value=1, key=k), then=[Step(two, t.double)], result=True)
            await drain(caller)
            assert await chained.result(timeout=10) == t.Number(value=4, key=k)
    finally:
        MemoryBroker.forget(url)
    assert len(refused) == 1 and t.ATTEMPTS[k] == 2, "step 1 ran again, then step 2 was queued"
