"""Faults on a real broker: SIGTERM, kill -9, crash loops, burst mode, cut connections, bad credentials.

Workers run as `nobs-amqp consume` subprocesses (their tasks leave files behind), or in
this process behind a TCP proxy that can cut connections; the shared broker is never touched.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import traceback
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from nobs_amqp import BrokerConnectionError, Project, Worker
from nobs_amqp.consumer import Consumer

from ..apps import tasks
from ..proxy import Proxy
from ..support import Broker, count_is, eventually, exception_chain, exit_code, output, pids, worker_process

PROJECT = "nobs-test"


def make(name: str, *, url: str | None = None, **options: Any) -> tuple[Project, Worker]:
    worker = Worker(name, **options)
    return Project(name=PROJECT, workers=[worker], url=url, packages=["tests"]), worker


async def burst(amqp_url: str, name: str, log: Path, timeout: float = 20.0, **options: Any) -> int:
    """Run a `--burst` worker to the end; return its pid (it must exit 0)."""
    with worker_process(amqp_url, name, log, "--burst", **options) as proc:
        code = await exit_code(proc, log, timeout)
    assert code == 0, f"burst worker exited {code}; log:\n{output(log)}"
    return proc.pid


# -- 1. SIGTERM ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_sigterm_finishes_running_task_returns_the_rest_and_exits_0(
    amqp_url: str, name: str, broker: Broker, tmp_path: Path
) -> None:
    project, worker = make(name)
    folder = str(tmp_path)
    async with project:
        await worker.queue(tasks.slow_file, tasks.FileJob(folder=folder, key="a", sleep=2))
        await worker.queue(tasks.slow_file, tasks.FileJob(folder=folder, key="b"))
    log = tmp_path / "worker.log"
    grace = 10.0
    with worker_process(amqp_url, name, log, "--concurrency", "1", "--grace-period", str(grace), concurrency=1) as proc:
        await eventually(lambda: pids(tmp_path, "a", "start"), timeout=15)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = await exit_code(proc, log, grace + 5)
        took = time.monotonic() - signalled
    assert code == 0, output(log)
    assert took < grace, f"took {took:.1f} s to stop, grace period {grace} s"
    assert pids(tmp_path, "a", "start") == [proc.pid]
    assert pids(tmp_path, "a", "done") == [proc.pid], "the running task was not let finish"
    assert pids(tmp_path, "b", "start") == [], "the second message started although the worker was stopping"
    await eventually(lambda: count_is(broker, name, 1), timeout=5)
    assert await broker.count(f"{name}.dlq") == 0

    # The finished message is gone; only the returned one runs, in the next worker.
    second = await burst(amqp_url, name, tmp_path / "burst.log")
    assert pids(tmp_path, "b", "start") == [second]
    assert pids(tmp_path, "b", "done") == [second]
    assert pids(tmp_path, "a", "start") == [proc.pid], "the finished message was redelivered"
    assert await broker.count(name) == 0
    assert await broker.count(f"{name}.dlq") == 0


# -- 2. kill -9 ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_kill_9_mid_task_redelivers_to_the_next_worker(
    amqp_url: str, name: str, broker: Broker, tmp_path: Path
) -> None:
    project, worker = make(name)
    async with project:
        await worker.queue(tasks.slow_file, tasks.FileJob(folder=str(tmp_path), key="a", sleep=3))
    log = tmp_path / "worker.log"
    with worker_process(amqp_url, name, log) as killed:
        await eventually(lambda: pids(tmp_path, "a", "start"), timeout=15)
        killed.kill()
        assert await exit_code(killed, log, 5) == -signal.SIGKILL
    assert pids(tmp_path, "a", "done") == []

    second = await burst(amqp_url, name, tmp_path / "burst.log")
    assert pids(tmp_path, "a", "start") == sorted([killed.pid, second])
    assert pids(tmp_path, "a", "done") == [second]
    assert await broker.count(name) == 0
    assert await broker.count(f"{name}.dlq") == 0


# -- 3. a task that kills its worker every time ----------------------------------------------


@pytest.mark.timeout(90)
async def test_crash_looping_task_ends_in_the_dlq(
    amqp_url: str, name: str, broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    limit = 2
    project, worker = make(name, delivery_limit=limit)
    async with project:
        await worker.queue(tasks.crash, tasks.FileJob(folder=str(tmp_path), key="c"))

    dlq = f"{name}.dlq"
    codes = []
    for run in range(6):
        log = tmp_path / f"worker-{run}.log"
        with worker_process(amqp_url, name, log, "--burst", delivery_limit=limit) as proc:
            codes.append(await exit_code(proc, log, 20))
        # The message is either back in the queue for the next worker, or dead-lettered
        # (by the worker, or asynchronously by the broker's at-least-once dead-lettering).
        await eventually(
            lambda: _any_holds(broker, name, dlq),
            timeout=10,
        )
        if await broker.count(dlq):
            break
    else:
        pytest.fail(f"not dead-lettered after {len(codes)} workers (exit codes {codes})")

    [dead] = await broker.take(dlq)
    headers = dict(dead.headers)
    reason = _text(headers.get("x-nobs-reason"))
    deaths = headers.get("x-death") or []
    broker_reasons = [_text(d.get("reason")) for d in deaths if isinstance(d, dict)]
    assert reason == "delivery_limit" or "delivery_limit" in broker_reasons, headers
    path = "consumer (x-nobs-reason)" if reason == "delivery_limit" else "broker (x-death)"
    starts = pids(tmp_path, "c", "start")
    assert 1 <= len(starts) <= limit + 1, starts
    assert await broker.count(name) == 0
    with capsys.disabled():
        print(
            f"\n[crash loop] dead-lettered by the {path} after {len(starts)} run(s); "
            f"worker exit codes {codes}; x-delivery-limit {limit}"
        )


async def _any_holds(broker: Broker, queue: str, dlq: str) -> bool:
    return await broker.count(queue) + await broker.count(dlq) > 0


def _text(value: object) -> object:
    return value.decode() if isinstance(value, bytes) else value


# -- 4. --burst ---------------------------------------------------------------------------


async def test_burst_on_an_empty_queue_exits_at_once(amqp_url: str, name: str, broker: Broker, tmp_path: Path) -> None:
    project, worker = make(name)
    async with project:
        await project.session.declare(worker, delayed=True)
    started = time.monotonic()
    await burst(amqp_url, name, tmp_path / "burst.log", timeout=10)
    assert time.monotonic() - started < 5, "a burst worker on an empty queue should exit at once"
    assert await broker.count(name) == 0


@pytest.mark.timeout(60)
async def test_burst_runs_everything_then_exits_0(amqp_url: str, name: str, broker: Broker, tmp_path: Path) -> None:
    project, worker = make(name)
    keys = [f"m{i}" for i in range(20)]
    async with project:
        await worker.queue_many(tasks.slow_file, [tasks.FileJob(folder=str(tmp_path), key=k) for k in keys])
    assert await broker.count(name) == 20
    pid = await burst(amqp_url, name, tmp_path / "burst.log", timeout=30)
    for k in keys:
        assert pids(tmp_path, k, "done") == [pid], k
    assert await broker.count(name) == 0
    assert await broker.count(f"{name}.dlq") == 0


# -- 5. connection loss -------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_worker_and_producer_survive_cut_connections(amqp_url: str, name: str, broker: Broker) -> None:
    keys = [f"{name}-{uuid.uuid4().hex[:8]}-{i}" for i in range(3)]
    async with Proxy() as proxy:
        project, worker = make(name, url=proxy.url_for(amqp_url))
        producer, direct = make(name, url=amqp_url)
        async with project, producer:
            consumer = Consumer(project.session, worker)
            running = asyncio.create_task(consumer.run())

            def called(key: str) -> bool:
                if running.done():
                    running.result()  # raises what killed the consumer
                    raise AssertionError("the consumer stopped by itself")
                return bool(tasks.calls(key))

            try:
                await direct.queue(tasks.record, tasks.Job(key=keys[0]))
                await eventually(lambda: called(keys[0]), timeout=15)

                # The worker's connection drops: it reconnects (through the proxy) and consumes again.
                connections = proxy.accepted
                assert proxy.cut() >= 1
                await direct.queue(tasks.record, tasks.Job(key=keys[1]))
                await eventually(lambda: called(keys[1]), timeout=20)
                assert proxy.accepted > connections
                await consumer.flush()  # its ack, batched for a few ms, goes out before the next cut

                # A producer whose broker is unreachable for a while: queue() waits it out.
                proxy.refusing = True
                assert proxy.cut() >= 1
                publishing = asyncio.create_task(worker.queue(tasks.record, tasks.Job(key=keys[2])))
                try:
                    await eventually(lambda: proxy.refused >= 1, timeout=15)
                    assert not publishing.done(), "queue() returned while the broker was unreachable"
                except BaseException:
                    publishing.cancel()
                    await asyncio.gather(publishing, return_exceptions=True)
                    raise
                finally:
                    proxy.refusing = False
                assert await asyncio.wait_for(publishing, 25)
                await eventually(lambda: called(keys[2]), timeout=20)
            finally:
                consumer.stop()
                await asyncio.wait_for(running, 15)
    assert len(tasks.calls(keys[1])) == 1
    assert len(tasks.calls(keys[2])) == 1
    assert await broker.count(name) == 0
    assert await broker.count(f"{name}.dlq") == 0


# -- 6. credentials -------------------------------------------------------------------------

SECRET = "s3cretpass"


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{password}@{host}"))


async def test_credentials_never_appear_in_errors_or_logs(
    vhost_url: str, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for url in (f"amqp://guest:{SECRET}@127.0.0.1:5672/nope", _with_password(vhost_url, SECRET)):
        project, _ = make(name, url=url)
        with pytest.raises(BrokerConnectionError) as raised:
            await project.open()
        assert not project.is_open
        for exc in exception_chain(raised.value):
            assert SECRET not in str(exc), f"{type(exc).__name__}: {exc}"
            assert SECRET not in repr(exc), repr(exc)
        assert SECRET not in "".join(traceback.format_exception(raised.value))
        assert "***" in str(raised.value), str(raised.value)
    assert caplog.records, "nothing was logged at DEBUG: is the capture working?"
    for record in caplog.records:
        text = record.getMessage() + (logging.Formatter().formatException(record.exc_info) if record.exc_info else "")
        assert SECRET not in text, f"{record.name}: {text}"
