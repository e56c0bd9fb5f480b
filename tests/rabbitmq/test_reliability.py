"""Regression tests for what a hostile publisher, a misbehaving task and bad luck did to a worker.

Each test here failed before its fix: messages left unsettled, tasks that stopped or
starved the worker, lost acks that forked a message, retries that looped, log lines a
message could forge, and messages that ran what is not a task.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import tenacity

from nobs_amqp import Project, TaskDefinitionError, TopologyMismatchError, Worker
from nobs_amqp import message as wire
from nobs_amqp.consumer import Consumer
from nobs_amqp.settled import SettledAttempts

from ..apps import tasks
from ..proxy import Proxy
from ..support import Broker, eventually, exit_code, output, pids, run_cli, take_messages, worker_process

PROJECT = "nobs-rel"
TASK = "tests.apps.tasks:record"


def key() -> str:
    return uuid.uuid4().hex


def make(
    url: str | None, name: str, *, project: dict[str, Any] | None = None, **options: Any
) -> tuple[Project, Worker]:
    worker = Worker(name, **options)
    return Project(name=PROJECT, workers=[worker], packages=["tests.apps"], url=url, **(project or {})), worker


@asynccontextmanager
async def consuming(project: Project, *workers: Worker, **options: Any) -> AsyncIterator[list[Consumer]]:
    async with project.consuming(*workers, grace_period=5, **options) as consumers:
        yield consumers


def job_body(k: str) -> bytes:
    return tasks.Job(key=k).model_dump_json().encode()


async def publish(project: Project, queue: str, body: bytes, task: str, *, message_id: str, **headers: object) -> None:
    message = wire.Message(body, task, message_id, "someone", wire.wall_clock(), {wire.ATTEMPT: 1, **headers})
    await project.session.transport.publish("", queue, message)


@pytest.fixture
async def ladder_cleanup(vhost_url: str) -> AsyncIterator[None]:
    """Tests that break this module's delay ladder delete it afterwards: the next test declares it fresh."""
    yield
    await delete_ladder(vhost_url, PROJECT)


async def delete_ladder(url: str, project: str) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        for level in range(28):
            await channel.queue_delete(f"{project}.delay.{level:02d}")
            await channel.exchange_delete(f"{project}.delay.{level:02d}")
    finally:
        await connection.close()


# -- 1. every delivery is settled exactly once, whatever raises -------------------------------


@pytest.mark.timeout(30)
async def test_a_project_function_pydantic_cannot_validate_is_dead_lettered_and_the_worker_goes_on(
    url: str, name: str
) -> None:
    project, worker = make(url, name, concurrency=1)
    k = key()
    with pytest.raises(TaskDefinitionError, match="pydantic cannot validate"):
        project.spec(tasks.weird)
    async with project, consuming(project, worker):
        for i in range(12):  # more than the prefetch: any left unsettled would stop the worker
            await publish(project, name, b'{"lock": 1}', "tests.apps.tasks:weird", message_id=f"weird-{i}")
        await worker.queue(tasks.record, tasks.Job(key=k))
        dead = await take_messages(project, f"{name}.dlq", 12)
        await eventually(lambda: tasks.calls(k))
    assert {d.headers[wire.REASON] for d in dead} == {"unknown_task"}
    assert "pydantic cannot validate" in str(dead[0].headers[wire.ERROR_MESSAGE])
    assert tasks.calls("weird") == []


@pytest.mark.timeout(30)
async def test_a_task_module_that_fails_to_import_costs_only_its_tasks(url: str, name: str) -> None:
    project, worker = make(url, name, concurrency=1)
    k = key()
    async with project, consuming(project, worker):
        for i in range(12):
            await publish(project, name, b'{"key": "x"}', "tests.apps.broken_tasks:ping", message_id=f"b-{i}")
        await worker.queue(tasks.record, tasks.Job(key=k))
        dead = await take_messages(project, f"{name}.dlq", 12)
        await eventually(lambda: tasks.calls(k))
    assert {d.headers[wire.REASON] for d in dead} == {"unknown_task"}
    assert "failed to import at worker start" in str(dead[0].headers[wire.ERROR_MESSAGE])


@pytest.mark.timeout(30)
async def test_forged_and_malformed_nobs_headers_are_validated_not_trusted(url: str, name: str) -> None:
    """A naive enqueued-at, an absurd attempt, junk x-nobs-* values: the retry and the dead letter
    carry only validated values of ours, and the task's own failure decides."""
    project, worker = make(url, name, concurrency=1, stop=tenacity.stop_after_attempt(2), wait=lambda s: 0)
    k = key()
    async with project, consuming(project, worker):
        await publish(
            project,
            name,
            job_body(k),
            "tests.apps.tasks:always_fail",
            message_id="naive",
            **{wire.ENQUEUED_AT: "2026-01-01T00:00:00", "x-nobs-junk": ["a", 1.5], wire.REASON: "forged"},
        )
        [dead] = await take_messages(project, f"{name}.dlq")
    assert len(tasks.calls(k)) == 2  # it ran, failed, was retried once, then dead-lettered
    assert dead.headers[wire.REASON] == "max_attempts"
    assert dead.headers[wire.ENQUEUED_AT] == "2026-01-01T00:00:00.000Z"
    assert "x-nobs-junk" not in dead.headers


def test_copies_keep_only_validated_headers() -> None:
    message = wire.Message(
        b"{}",
        "t:f",
        "id\n",
        "app",
        wire.wall_clock(),
        {wire.ATTEMPT: 10**30, wire.ENQUEUED_AT: 17, "x-nobs-x": 1e300, "x-death": [{"reason": "expired"}]},
    )
    for copy in (
        wire.retry_copy(message, 2, now=wire.wall_clock()),
        wire.dead_letter_copy(message, wire.Reason.REJECTED, ValueError("no"), now=wire.wall_clock()),
    ):
        assert set(copy.headers) <= {
            wire.ATTEMPT,
            wire.ENQUEUED_AT,
            wire.ETA,
            wire.REASON,
            wire.FAILED_AT,
            wire.WORKER_HOST,
            wire.ERROR_TYPE,
            wire.ERROR_MESSAGE,
            wire.TRACEBACK,
        }
        assert isinstance(copy.headers[wire.ATTEMPT], int) and copy.headers[wire.ATTEMPT] < 2**31


@pytest.mark.timeout(30)
async def test_a_failure_inside_the_worker_still_settles_the_message(
    url: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug of ours while settling (here: building the dead letter raises) costs that message
    only: it is rejected to the dead-letter exchange, and the worker goes on."""
    project, worker = make(url, name, concurrency=1)
    k = key()

    def broken(*args: object, **kwargs: object) -> wire.Message:
        raise RuntimeError("bug while building the dead letter")

    monkeypatch.setattr(wire, "dead_letter_copy", broken)
    async with project, consuming(project, worker):
        for i in range(12):
            await publish(project, name, b"not json", TASK, message_id=f"x-{i}")
        await worker.queue(tasks.record, tasks.Job(key=k))
        dead = await take_messages(project, f"{name}.dlq", 12)
        await eventually(lambda: tasks.calls(k))
    assert all(d.message_id.startswith("x-") for d in dead)


# -- 3. a hung sync task does not starve the others; a blocked loop is found ----------------


@pytest.mark.timeout(40)
async def test_hung_sync_tasks_do_not_starve_healthy_ones(url: str, name: str) -> None:
    project, worker = make(url, name, concurrency=2, time_limit=0.5, stop=tenacity.stop_after_attempt(1))
    hung, healthy = key(), key()
    async with project, consuming(project, worker) as [consumer]:
        for _ in range(4):
            await worker.queue(tasks.hang_sync, tasks.Hang(key=hung, seconds=8))
        await eventually(lambda: len(tasks.calls(hung)) == 4, timeout=10)
        for _ in range(20):
            await worker.queue(tasks.record_sync, tasks.SyncJob(key=healthy, numbers=[]))
        await eventually(lambda: len(tasks.calls(healthy)) == 20, timeout=15)
        dead = await take_messages(project, f"{name}.dlq", 4)
        assert consumer.runner.stuck == 4
    assert [d.headers[wire.REASON] for d in dead] == ["time_limit"] * 4


@pytest.mark.timeout(30)
async def test_an_async_task_that_ignores_cancellation_does_not_hold_its_slot(url: str, name: str) -> None:
    project, worker = make(url, name, concurrency=1, time_limit=0.3, stop=tenacity.stop_after_attempt(1))
    stubborn, healthy = key(), key()
    async with project, consuming(project, worker) as [consumer]:
        await worker.queue(tasks.stubborn, tasks.Job(key=stubborn, sleep=8))
        await worker.queue(tasks.record, tasks.Job(key=healthy))
        await eventually(lambda: tasks.calls(healthy), timeout=5)
        [dead] = await take_messages(project, f"{name}.dlq")
        assert consumer.runner.stuck == 1
    assert dead.headers[wire.REASON] == "time_limit"


@pytest.mark.timeout(60)
async def test_a_task_blocking_the_loop_is_named_and_sigterm_still_stops_the_worker(
    amqp_url: str, name: str, tmp_path: Path
) -> None:
    project, worker = make(amqp_url, name)
    async with project:
        await worker.queue(tasks.block_loop, tasks.FileJob(folder=str(tmp_path), key="b", sleep=30))
    log = tmp_path / "worker.log"
    with worker_process(amqp_url, name, log) as proc:
        await eventually(lambda: pids(tmp_path, "b", "start"), timeout=15)
        await eventually(lambda: "event loop blocked" in output(log), timeout=10)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await eventually(lambda: proc.poll() is not None, timeout=10, interval=0.05)
        took = time.monotonic() - signalled
    text = output(log)
    assert proc.returncode == 0, text
    assert took < 5, f"took {took:.1f} s to stop; log:\n{text}"
    assert "tests.apps.tasks:block_loop" in text
    assert "cannot drain, exiting now" in text


# -- 4. SystemExit and KeyboardInterrupt are the task's failure ------------------------------


@pytest.mark.timeout(30)
async def test_system_exit_and_keyboard_interrupt_in_tasks_are_failures(url: str, name: str) -> None:
    project, worker = make(url, name, stop=tenacity.stop_after_attempt(1))
    a, b, k = key(), key(), key()
    async with project, consuming(project, worker):
        await worker.queue(tasks.exit_task, tasks.Job(key=a))
        await worker.queue(tasks.interrupt_sync, tasks.SyncJob(key=b, numbers=[]))
        dead = await take_messages(project, f"{name}.dlq", 2)
        await worker.queue(tasks.record, tasks.Job(key=k))
        await eventually(lambda: tasks.calls(k))
    assert sorted(str(d.headers[wire.ERROR_MESSAGE]) for d in dead) == [
        "the task raised KeyboardInterrupt()",
        "the task raised SystemExit(0)",
    ]


@pytest.mark.timeout(40)
async def test_a_cli_main_named_by_a_message_does_not_stop_the_worker(amqp_url: str, name: str, tmp_path: Path) -> None:
    project, worker = make(amqp_url, name)
    log = tmp_path / "worker.log"
    async with project:
        await project.session.declare(worker, delayed=False)
        await publish(project, name, b'["--help"]', "tests.apps.tasks:main", message_id="main")
        await worker.queue(tasks.slow_file, tasks.FileJob(folder=str(tmp_path), key="after"))
        with worker_process(amqp_url, name, log) as proc:
            await eventually(lambda: pids(tmp_path, "after", "done"), timeout=15)
            [dead] = await take_messages(project, f"{name}.dlq")
            assert proc.poll() is None, output(log)
    assert dead.headers[wire.REASON] == "unknown_task"


# -- 5. a lost ack does not fork a message -------------------------------------------------


class _CutBeforeAck(Consumer):
    """Cuts every connection right after an outcome is final and before its ack is sent, once."""

    proxy: Proxy
    cuts = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._attempts = _Cutting(self)


class _Cutting(SettledAttempts):
    """The settled attempts of a `_CutBeforeAck`: remembering the first one cuts its connections."""

    def __init__(self, consumer: _CutBeforeAck) -> None:
        super().__init__()
        self._consumer = consumer

    def remember(self, identity: Any) -> None:
        super().remember(identity)
        if _CutBeforeAck.cuts == 0:
            _CutBeforeAck.cuts += 1
            self._consumer.proxy.cut()


@pytest.mark.timeout(40)
@pytest.mark.parametrize("fail_times", [0, 1])
async def test_a_lost_ack_does_not_run_the_task_again(vhost_url: str, name: str, fail_times: int) -> None:
    """Success, and a retry whose copy was confirmed: the original's ack is lost with the
    connection, the broker redelivers it, and the worker acks it without running it again."""
    async with Proxy() as proxy:
        project, worker = make(proxy.url_for(vhost_url), name, wait=lambda s: 1)
        # The task is queued past the proxy: the cut may come before the broker's confirm of this
        # publish reaches the producer, which then sends it again (at least once): a second
        # message, not the lost ack this test is about.
        producer, producer_worker = make(vhost_url, name, wait=lambda s: 1)
        k = key()
        _CutBeforeAck.cuts = 0
        async with project, producer:
            consumer = _CutBeforeAck(project.session, worker, grace_period=5)
            consumer.proxy = proxy
            run = asyncio.create_task(consumer.run())
            try:
                await asyncio.wait_for(consumer.ready.wait(), 10)
                await producer_worker.queue(tasks.record, tasks.Job(key=k, fail_times=fail_times))
                await eventually(lambda: len(tasks.calls(k)) == fail_times + 1, timeout=15)
                # the outcome is remembered (and the connection cut) just after the task returns
                await eventually(lambda: _CutBeforeAck.cuts == 1, timeout=5)
                await eventually(lambda: proxy.accepted >= 2, timeout=10)  # reconnected; redelivery comes
                await eventually(lambda: consumer.duplicates == 1, timeout=15)
                await eventually(lambda: consumer.processed == fail_times + 1, timeout=15)
                await asyncio.sleep(0.5)
            finally:
                consumer.stop()
                await asyncio.wait_for(run, 30)
        assert len(tasks.calls(k)) == fail_times + 1
        async with Broker(vhost_url) as broker:
            assert await broker.count(f"{name}.dlq") == 0


@pytest.mark.timeout(40)
async def test_a_lost_publish_confirm_does_not_run_the_task_twice(vhost_url: str, name: str) -> None:
    """The broker took a task and the worker ran it, but the confirm of queue() was lost with the
    producer's connection: queue() sends it again, marked as sent again, and the worker that ran
    it acks that copy without running it."""
    consuming_project, consumed = make(vhost_url, name)
    warm, k = key(), key()
    async with Proxy() as proxy:
        producer, worker = make(proxy.url_for(vhost_url), name)
        async with consuming_project, producer, consuming(consuming_project, consumed) as [consumer]:
            await worker.queue(tasks.record, tasks.Job(key=warm))  # connected, channels open, declared
            await eventually(lambda: consumer.processed == 1, timeout=15)
            proxy.hold()  # the confirm of the next publish waits in the proxy
            queued = asyncio.create_task(worker.queue(tasks.record, tasks.Job(key=k)))
            await eventually(lambda: consumer.processed == 2, timeout=15)  # it ran and was settled
            assert not queued.done(), "queue() returned without the broker's confirm"
            proxy.cut()
            proxy.release()
            await asyncio.wait_for(queued, 30)  # sent again on a new connection, and confirmed
            await eventually(lambda: consumer.duplicates == 1, timeout=15)
            assert consumer.processed == 2
    assert len(tasks.calls(k)) == 1
    async with Broker(vhost_url) as broker:
        assert await broker.count(f"{name}.dlq") == 0
        assert await broker.count(name) == 0


# -- 6. a retry copy that cannot be placed does not loop the task -----------------------------


@pytest.mark.timeout(40)
@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
@pytest.mark.parametrize("deleted", ["queue", "exchange"])
async def test_a_deleted_ladder_is_declared_again_and_the_retry_waits(
    amqp_url: str, name: str, broker: Any, queue_type: str, deleted: str, ladder_cleanup: None
) -> None:
    project, worker = make(amqp_url, name, queue_type=queue_type, wait=lambda s: 1)
    k = key()
    async with project, consuming(project, worker):
        await worker.queue(tasks.record, tasks.Job(key=k), delay=1)  # the ladder exists
        await eventually(lambda: tasks.calls(k))
        channel = await broker.channel()
        if deleted == "queue":
            await channel.queue_delete(f"{PROJECT}.delay.00")
        else:
            await channel.exchange_delete(f"{PROJECT}.delay.00")
        await channel.close()
        k2 = key()
        await worker.queue(tasks.record, tasks.Job(key=k2, fail_times=1))
        await eventually(lambda: len(tasks.calls(k2)) == 2, timeout=15)
        await asyncio.sleep(0.5)
    runs = tasks.calls(k2)
    assert len(runs) == 2, f"ran {len(runs)} times"
    assert runs[1] - runs[0] >= 0.9, "the retry ran before its delay"


@pytest.mark.timeout(40)
async def test_a_ladder_with_other_arguments_stops_the_worker_at_start(amqp_url: str, name: str, broker: Any) -> None:
    project_name = f"mismatch-{key()[:8]}"
    channel = await broker.channel()
    await channel.declare_queue(f"{project_name}.delay.03", durable=True, arguments={"x-message-ttl": 5})
    await channel.close()
    worker = Worker(name)
    project = Project(name=project_name, workers=[worker], packages=["tests.apps"])
    try:
        async with project:
            with pytest.raises(TopologyMismatchError, match=rf"{project_name}\.delay\.03"):
                await asyncio.wait_for(Consumer(project.session, worker, grace_period=1).run(), 10)
    finally:
        await delete_ladder(broker.url, project_name)


# -- 9. log injection ------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_untrusted_values_cannot_forge_log_lines(url: str, name: str, caplog: pytest.LogCaptureFixture) -> None:
    project, worker = make(url, name, stop=tenacity.stop_after_attempt(1))
    caplog.set_level(logging.DEBUG, logger="nobs_amqp")
    forged = "\nCRITICAL nobs_amqp: all your base\r"
    async with project, consuming(project, worker):
        await publish(project, name, b"{}", "tests.apps.tasks:nope" + forged, message_id="id" + forged)
        await publish(project, name, job_body(f"k{forged}"), "tests.apps.tasks:always_fail", message_id="m" + forged)
        await take_messages(project, f"{name}.dlq", 2)
    lines = [r.getMessage() for r in caplog.records if r.name == "nobs_amqp"]
    assert any("all your base" in line for line in lines)
    for line in lines:
        assert "\n" not in line and "\r" not in line, line


# -- 10. a message runs tasks only -----------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("task", "body"),
    [("tests.apps.tasks:helper_int", b"7"), ("tests.apps.tasks:main", b'["--json", "x"]')],
)
async def test_project_functions_that_are_not_tasks_do_not_run(url: str, name: str, task: str, body: bytes) -> None:
    project, worker = make(url, name)
    async with project, consuming(project, worker):
        await publish(project, name, body, task, message_id="not-a-task")
        [dead] = await take_messages(project, f"{name}.dlq")
    assert dead.headers[wire.REASON] == "unknown_task"
    assert "is not a task" in str(dead.headers[wire.ERROR_MESSAGE])
    assert tasks.calls("helper-7") == [] and tasks.calls("main---json-x") == []


async def test_a_function_listed_in_tasks_runs_with_any_payload_type(url: str, name: str) -> None:
    worker = Worker(name)
    project = Project(name=PROJECT, workers=[worker], packages=[], tasks=[tasks.helper_int], url=url)
    with pytest.raises(TaskDefinitionError, match=r"list it in Project\(tasks=\[...\]\)"):
        make(url, name + "x")[0].spec(tasks.helper_int)
    n = int(time.time() * 1000) % 10**9
    async with project, consuming(project, worker):
        await worker.queue(tasks.helper_int, n)
        await eventually(lambda: tasks.calls(f"helper-{n}"))


@pytest.mark.timeout(30)
async def test_a_message_never_causes_an_import(url: str, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "tests.apps.unloaded", raising=False)
    worker = Worker(name)
    project = Project(name=PROJECT, workers=[worker], packages=["tests"], modules=["tests.apps.tasks"], url=url)
    async with project, consuming(project, worker):
        await publish(project, name, b'{"key": "x"}', "tests.apps.unloaded:ping", message_id="unloaded")
        [dead] = await take_messages(project, f"{name}.dlq")
    assert dead.headers[wire.REASON] == "unknown_task"
    assert "tests.apps.unloaded" not in sys.modules


# -- 3b. workers that tasks made unhealthy replace themselves ---------------------------------


@pytest.mark.timeout(60)
async def test_a_worker_past_its_memory_limit_finishes_and_exits_to_be_replaced(
    amqp_url: str, name: str, tmp_path: Path
) -> None:
    project, worker = make(amqp_url, name)
    async with project:
        for i in range(6):
            await worker.queue(tasks.leak, tasks.FileJob(folder=str(tmp_path), key=f"leak{i}"))
    log = tmp_path / "worker.log"
    with worker_process(amqp_url, name, log, "--max-memory", "200", "--concurrency", "1", concurrency=1) as proc:
        await eventually(lambda: proc.poll() is not None, timeout=40, interval=0.05)
    text = output(log)
    assert proc.returncode == 75, text
    assert "over the limit of 200 MiB" in text
    done = sum(len(pids(tmp_path, f"leak{i}", "done")) for i in range(6))
    assert 1 <= done < 6, text  # it stopped early; what it ran was acked, the rest waits in the queue
    async with project:
        assert await project.session.transport.message_count(name) == 6 - done


@pytest.mark.timeout(60)
async def test_a_child_whose_threads_are_stuck_is_replaced_and_the_queue_keeps_flowing(
    amqp_url: str, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOBS_TEST_TIME_LIMIT", "0.5")
    monkeypatch.setenv("NOBS_TEST_MAX_ATTEMPTS", "1")
    project, worker = make(amqp_url, name)
    hung = key()
    async with project:
        for _ in range(2):
            await worker.queue(tasks.hang_sync, tasks.Hang(key=hung, seconds=30))
    log = tmp_path / "worker.log"
    options = ("--processes", "2", "--concurrency", "1", "--grace-period", "1")
    with worker_process(amqp_url, name, log, *options, concurrency=1) as proc:
        await eventually(lambda: output(log).count("replaced itself") >= 2, timeout=30)
        async with project:
            await worker.queue(tasks.slow_file, tasks.FileJob(folder=str(tmp_path), key="after"))
            try:
                await eventually(lambda: pids(tmp_path, "after", "done"), timeout=20)
            except AssertionError:
                raise AssertionError(output(log)) from None
            dead = await take_messages(project, f"{name}.dlq", 2)
        proc.send_signal(signal.SIGTERM)
        await exit_code(proc, log, 20)
    assert proc.returncode == 0, output(log)
    assert [d.headers[wire.REASON] for d in dead] == ["time_limit", "time_limit"]


@pytest.mark.timeout(40)
async def test_dlq_list_and_show_do_not_pass_control_characters_to_the_terminal(amqp_url: str, name: str) -> None:
    project, worker = make(amqp_url, name)
    evil = "\x1b]0;pwned\x07\x1b[2J"
    async with project:
        await project.session.declare(worker, delayed=False)
        message = wire.Message(
            b'{"key": "\x1b[31m"}',
            TASK + evil,
            "evil",
            "x",
            wire.wall_clock(),
            {wire.ERROR_MESSAGE: evil, wire.REASON: evil},
        )
        await project.session.transport.publish("", f"{name}.dlq", message)
    env = {"NOBS_AMQP_URL": amqp_url, "NOBS_TEST_WORKER": name}
    for command in (["dlq", "list", name], ["dlq", "show", name, "evil"]):
        code, text = await run_cli("--app", "tests.apps.cli_app:project", *command, env=env)
        assert code == 0, text
        assert "\x1b" not in text and "\x07" not in text, repr(text)
        assert "\\x1b" in text, text


@pytest.mark.timeout(30)
async def test_a_deleted_dead_letter_binding_is_declared_again_and_the_dead_letter_arrives(
    amqp_url: str, name: str, broker: Any
) -> None:
    project, worker = make(amqp_url, name)
    k = key()
    async with project, consuming(project, worker):
        channel = await broker.channel()
        dlq = await channel.declare_queue(f"{name}.dlq", passive=True)
        await dlq.unbind(f"{name}.dlx", "")
        await channel.close()
        await worker.queue(tasks.reject, tasks.Job(key=k))
        [dead] = await take_messages(project, f"{name}.dlq")
    assert dead.headers[wire.REASON] == "rejected"
    assert len(tasks.calls(k)) == 1
