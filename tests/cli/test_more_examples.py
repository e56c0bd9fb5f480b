"""The FastAPI, ML-inference and webhook examples, run as a user runs them.

Services and workers run as subprocesses (uvicorn, `nobs-amqp consume`), each killed on
the way out whatever happened; the in-process variants use the same modules.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest

from examples.fastapi_service.app import CONSUME_ENV, app, composed_app
from examples.fastapi_service.tasks import OUTBOX_ENV, emails
from examples.fastapi_service.tasks import project as email_project
from examples.ml_inference import enqueue
from examples.ml_inference.app import predict
from examples.ml_inference.app import project as ml_project
from examples.webhooks import demo
from examples.webhooks.endpoint import Endpoint
from examples.webhooks.tasks import project as webhook_project
from examples.webhooks.tasks import webhooks
from nobs_amqp.testing import drain
from nobs_amqp.transports.memory import MemoryBroker

from .. import support
from ..proxy import Proxy, broker_address
from ..support import Broker, eventually, exit_code, free_port, output

# -- helpers ------------------------------------------------------------------------------


def process(command: list[str], *, env: dict[str, str], log: Path) -> AbstractContextManager[subprocess.Popen[bytes]]:
    """`command` in its own process group, with unbuffered output (see support.process)."""
    return support.process(command, env={"PYTHONUNBUFFERED": "1", **env}, log=log)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def consumers(broker: Broker, queue: str) -> int:
    """Consumers on `queue` (0 while it does not exist yet)."""
    channel = await broker.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.consumer_count or 0)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return 0
    finally:
        if not channel.is_closed:
            await channel.close()


def sent(outbox: Path) -> list[dict[str, Any]]:
    """What the email task recorded."""
    return [json.loads(line) for line in outbox.read_text().splitlines()] if outbox.exists() else []


def email(i: int) -> dict[str, str]:
    return {"to": f"user{i}@example.com", "subject": f"hello {i}", "body": "from the test"}


# -- 1. FastAPI ---------------------------------------------------------------------------


async def test_fastapi_queues_200_concurrent_posts_then_a_worker_runs_them(
    amqp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outbox = tmp_path / "outbox.jsonl"
    monkeypatch.setenv(OUTBOX_ENV, str(outbox))
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://service") as client,
    ):
        responses = await asyncio.gather(*(client.post("/emails", json=email(i)) for i in range(200)))
        assert [r.status_code for r in responses] == [202] * 200
        assert len({r.json()["message_id"] for r in responses}) == 200
        refused = await client.post("/emails", json={"to": "not an address", "subject": "x"})
        assert refused.status_code == 422  # pydantic refuses it before anything is queued
        assert sent(outbox) == [], "nothing runs without a worker"
        processed = await drain(email_project, emails, timeout=30)
    # At least once: a redelivered message runs again, so count distinct emails.
    assert processed >= 200
    assert {line["to"] for line in sent(outbox)} == {email(i)["to"] for i in range(200)}


async def test_fastapi_own_lifespan_can_consume_in_process(
    amqp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outbox = tmp_path / "outbox.jsonl"
    monkeypatch.setenv(OUTBOX_ENV, str(outbox))
    monkeypatch.setenv(CONSUME_ENV, "1")
    transport = httpx.ASGITransport(app=composed_app)
    async with (
        composed_app.router.lifespan_context(composed_app) as state,
        httpx.AsyncClient(transport=transport, base_url="http://service") as client,
    ):
        assert state == {"consuming": True}
        responses = await asyncio.gather(*(client.post("/emails", json=email(i)) for i in range(20)))
        assert [r.status_code for r in responses] == [202] * 20
        await eventually(lambda: len(sent(outbox)) >= 20, timeout=15)
    assert {line["to"] for line in sent(outbox)} == {email(i)["to"] for i in range(20)}
    assert {line["pid"] for line in sent(outbox)} == {os.getpid()}, "no other process ran them"
    assert len({line["client"] for line in sent(outbox)}) == 1, "one HTTP client, opened by the worker's lifespan"
    assert {line["message_id"] for line in sent(outbox)} == {r.json()["message_id"] for r in responses}
    assert not email_project.is_open


async def _answers(client: httpx.AsyncClient) -> bool:
    try:
        answer: object = (await client.get("/health")).json()
    except httpx.TransportError:
        return False
    return answer == {"broker": True}


@pytest.mark.timeout(90)
async def test_fastapi_under_uvicorn_with_a_worker_process(amqp_url: str, tmp_path: Path) -> None:
    outbox = tmp_path / "outbox.jsonl"
    env = {"NOBS_AMQP_URL": amqp_url, OUTBOX_ENV: str(outbox)}
    port = free_port()
    server_log = tmp_path / "uvicorn.log"
    uvicorn = [sys.executable, "-m", "uvicorn", "examples.fastapi_service.app:app", "--no-access-log"]
    # The service reaches the broker over a link with 5 ms latency each way, as across a network:
    # on loopback a publisher confirm takes about as long as the HTTP request around it.
    async with Proxy(*broker_address(amqp_url), latency=0.005) as link:
        server_env = {**env, "NOBS_AMQP_URL": link.url_for(amqp_url)}
        with process([*uvicorn, "--host", "127.0.0.1", "--port", str(port)], env=server_env, log=server_log) as server:
            await _post_sequentially_and_concurrently(port, server, server_log)

    worker_log = tmp_path / "worker.log"
    command = [sys.executable, "-m", "nobs_amqp", "--app", "examples.fastapi_service.tasks:project"]
    with process([*command, "consume", "emails", "--burst"], env=env, log=worker_log) as worker:
        code = await exit_code(worker, worker_log, 30)
    assert code == 0, output(worker_log)
    ran = re.search(r"stopped after (\d+) task\(s\)", output(worker_log))
    assert ran and int(ran.group(1)) >= 401, output(worker_log)
    lines = sent(outbox)
    assert {line["to"] for line in lines} == {email(i)["to"] for i in range(401)}
    assert {line["pid"] for line in lines} == {worker.pid}


async def _post_sequentially_and_concurrently(port: int, server: subprocess.Popen[bytes], log: Path) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as client:
        await eventually(lambda: _answers(client), timeout=20, interval=0.1)
        assert (await client.post("/emails", json=email(0))).status_code == 202  # warm: declares the queue
        await asyncio.gather(*(client.get("/health") for _ in range(100)))  # warm: opens the connections

        started = time.monotonic()
        for i in range(1, 201):
            assert (await client.post("/emails", json=email(i))).status_code == 202
        sequential = time.monotonic() - started

        started = time.monotonic()
        responses = await asyncio.gather(*(client.post("/emails", json=email(i)) for i in range(201, 401)))
        concurrent = time.monotonic() - started
    assert [r.status_code for r in responses] == [202] * 200
    assert len({r.json()["message_id"] for r in responses}) == 200
    # Each queue() waits for its publisher confirm; concurrent requests wait at the same time.
    assert concurrent < sequential, f"200 POSTs: concurrently {concurrent:.2f} s, one by one {sequential:.2f} s"
    print(f"200 POSTs: concurrently {concurrent:.2f} s, one by one {sequential:.2f} s")
    server.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully (closing the project), then re-raises the signal: exit -15.
    assert await exit_code(server, log, 15) in (0, -signal.SIGTERM), output(log)
    assert "Application shutdown complete" in output(log)


# -- 2. ML inference ----------------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_ml_inference_on_two_worker_processes(amqp_url: str, broker: Broker, tmp_path: Path) -> None:
    log = tmp_path / "supervisor.log"
    command = [sys.executable, "-m", "nobs_amqp", "--app", "examples.ml_inference.app:project"]
    command += ["consume", "inference", "--processes", "2"]
    with process(command, env={"NOBS_AMQP_URL": amqp_url}, log=log) as sup:
        # Both processes consume before anything is queued, so neither gets it all.
        await eventually(lambda: _consumers_are(broker, "inference", 2), timeout=30, interval=0.1)
        found = re.search(r"started 2 worker processes \(pids \[(\d+), (\d+)\]\)", output(log))
        assert found, output(log)
        children = {int(found.group(1)), int(found.group(2))}

        batch = enqueue.requests(8, tmp_path / "results", samples=50_000)
        async with ml_project:
            assert len(set(await enqueue.enqueue(batch))) == 8
        await eventually(lambda: len(enqueue.results(batch)) == 8, timeout=40, interval=0.1)
        results = enqueue.results(batch)

        sup.send_signal(signal.SIGTERM)
        code = await exit_code(sup, log, 40)
    assert code == 0, output(log)
    assert {r.pid for r in results.values()} == children, "both worker processes computed results"
    assert not [pid for pid in children if alive(pid)], "a worker process outlived its supervisor"
    first = results[batch[0].request_id]
    assert (first.positives, first.mean_score) == predict(50_000, batch[0].seed)


async def _consumers_are(broker: Broker, queue: str, n: int) -> bool:
    return await consumers(broker, queue) == n


# -- 3. webhooks --------------------------------------------------------------------------


def check_webhook_outcomes(outcomes: dict[str, dict[str, Any]]) -> None:
    flaky, throttled, broken, gone = (outcomes[n] for n in ("flaky", "throttled", "broken", "gone"))
    assert flaky["statuses"] == [503, 503, 200]
    assert flaky["delivered"] and flaky["dead"] is None
    assert all(gap >= 1 for gap in flaky["gaps"]), flaky

    assert throttled["statuses"] == [429, 200]
    assert throttled["delivered"]
    assert throttled["gaps"][0] >= 1, "Retry-After: 1 was not honoured"

    assert broken["statuses"] == [500] * 4
    assert not broken["delivered"]
    assert all(gap >= 1 for gap in broken["gaps"]), broken
    # About 2, 3 and 4 s (1, 2, 4 s plus jitter, rounded up to whole seconds); a busy broker
    # can hand a delayed message over a second late, so compare only the first and the last.
    assert broken["gaps"][-1] > broken["gaps"][0], f"waits should grow: {broken['gaps']}"
    assert broken["dead"]["x-nobs-reason"] == "max_attempts"
    assert broken["dead"]["x-nobs-attempt"] == 4
    assert broken["dead"]["x-nobs-error-type"] == "httpx.HTTPStatusError"

    assert gone["statuses"] == [410]
    assert gone["dead"]["x-nobs-reason"] == "rejected"
    assert gone["dead"]["x-nobs-error-message"] == "endpoint gone"


@pytest.mark.timeout(60)
async def test_webhooks_demo_on_rabbitmq(amqp_url: str, broker: Broker, tmp_path: Path) -> None:
    log, report = tmp_path / "demo.log", tmp_path / "outcomes.json"
    command = [sys.executable, "-m", "examples.webhooks.demo", "--json", str(report)]
    started = time.monotonic()
    with process(command, env={"NOBS_AMQP_URL": amqp_url}, log=log) as proc:
        code = await exit_code(proc, log, 45)
    text = output(log)
    assert code == 0, text
    assert time.monotonic() - started < 30, text
    outcomes = {o["name"]: o for o in json.loads(report.read_text())}
    check_webhook_outcomes(outcomes)
    assert "flaky     delivered on attempt 3" in text
    assert "broken    in webhooks.dlq after 4 attempt(s): max_attempts" in text

    # The dead letters really are in webhooks.dlq, as an operator finds them.
    dead = {m.message_id: m.headers for m in await broker.take("webhooks.dlq", 2)}
    for name, reason in (("broken", b"max_attempts"), ("gone", b"rejected")):
        assert dead[outcomes[name]["message_id"]]["x-nobs-reason"] in (reason, reason.decode())


async def test_webhooks_on_memory_with_drain(nobs_amqp_memory: MemoryBroker) -> None:
    started = time.monotonic()
    async with Endpoint(clock=nobs_amqp_memory.now) as endpoint, webhook_project:
        queued = await demo.queue_calls(endpoint)
        await drain(webhook_project, webhooks, timeout=20)
        found = await demo.outcomes(queued, endpoint)
    assert time.monotonic() - started < 5, "the virtual clock should make the waits instant"
    check_webhook_outcomes({o.name: o.as_json() for o in found})
