"""Prometheus metrics and health (`/metrics`, `/livez`, `/readyz`): counted against what ran, on
memory:// in this process, and on RabbitMQ under `nobs-amqp consume --metrics-port`, one process
and `--processes 2`; a blocked event loop, a lost connection and a SIGTERM drain as health sees them."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
import tenacity
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from nobs_amqp import Project, Worker
from nobs_amqp.observe.health import STALE_SECONDS, Children
from nobs_amqp.observe.metrics import FOLDER_PREFIX, PrometheusMetrics, exporting, remove_orphan_folders
from nobs_amqp.observe.observer import DRAINING, READY, STOPPED, Observer
from nobs_amqp.testing import drain

from ..apps import tasks
from ..proxy import Proxy
from ..support import (
    Broker,
    eventually,
    exit_code,
    free_port,
    output,
    pids,
    publish_raw_message,
    run_cli,
    worker_process,
)

PROJECT = "nobs-test"
RECORD, REJECT, SLOW = "tests.apps.tasks:record", "tests.apps.tasks:reject", "tests.apps.tasks:slow_file"
FAIL = "tests.apps.tasks:always_fail"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def fetch(port: int, path: str) -> tuple[int, bytes]:
    """GET http://127.0.0.1:port/path (blocking): status and body."""
    try:
        with _NO_PROXY.open(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


async def health(port: int, path: str = "/readyz") -> tuple[int, dict[str, Any]]:
    status, body = await asyncio.to_thread(fetch, port, path)
    return status, orjson.loads(body)


async def scrape(port: int) -> Samples:
    status, body = await asyncio.to_thread(fetch, port, "/metrics")
    assert status == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def answers(port: int, path: str, status: int, **fields: object) -> dict[str, Any] | None:
    """The report at `path` if it came with `status` and has `fields` (for `eventually`); None before the
    endpoint listens."""
    try:
        got, report = await health(port, path)
    except urllib.error.URLError:
        return None
    matches = got == status and all(report.get(k) == v for k, v in fields.items())
    return report if matches else None


def key() -> str:
    return uuid.uuid4().hex


# -- in this process, memory:// (no broker) ------------------------------------------------------


async def test_each_outcome_is_counted_per_task_with_bounded_labels() -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry=registry)
    worker = Worker(f"metrics-{key()[:8]}", stop=tenacity.stop_after_attempt(2), wait=lambda state: 1)
    project = Project(PROJECT, [worker], packages=["tests"], url=f"memory://{key()}", observers=[metrics])
    async with project:
        for _ in range(2):
            await worker.queue(tasks.record, tasks.Job(key=key()))
        await worker.queue(tasks.record, tasks.Job(key=key(), fail_times=1))  # a retry, then a success
        await worker.queue(tasks.reject, tasks.Job(key=key()))
        await worker.queue(tasks.always_fail, tasks.Job(key=key()))  # a retry, then max_attempts
        await publish_raw_message(project, worker.name, b"{}", "os:system", "evil-id")
        assert await drain(project, timeout=30) == 8

    w = worker.name

    def get(name: str, task: str | None = None, **labels: str) -> float:
        return registry.get_sample_value(name, {"worker": w, **({"task": task} if task else {}), **labels}) or 0.0

    assert get("nobs_amqp_tasks_started_total", RECORD) == 4
    assert get("nobs_amqp_tasks_succeeded_total", RECORD) == 3
    assert get("nobs_amqp_tasks_failed_total", RECORD) == 1
    assert get("nobs_amqp_tasks_retried_total", RECORD) == 1
    assert get("nobs_amqp_tasks_dead_lettered_total", REJECT, reason="rejected") == 1
    assert get("nobs_amqp_tasks_failed_total", FAIL) == 2
    assert get("nobs_amqp_tasks_retried_total", FAIL) == 1
    assert get("nobs_amqp_tasks_dead_lettered_total", FAIL, reason="max_attempts") == 1
    assert get("nobs_amqp_tasks_dead_lettered_total", "unknown", reason="unknown_task") == 1
    assert get("nobs_amqp_task_duration_seconds_count", RECORD) == 4
    assert get("nobs_amqp_deliveries_total", outcome="succeeded") == 3
    assert get("nobs_amqp_deliveries_total", outcome="retried") == 2
    assert get("nobs_amqp_deliveries_total", outcome="dead_lettered") == 3
    assert get("nobs_amqp_tasks_in_flight") == 0
    assert get("nobs_amqp_messages_held") == 0
    assert get("nobs_amqp_consumer_state", state="stopped") == 1
    assert get("nobs_amqp_messages_published_total", kind="task") == 5  # the raw one was not queue()d
    assert get("nobs_amqp_messages_published_total", kind="retry") == 2
    assert get("nobs_amqp_messages_published_total", kind="dead_letter") == 3
    assert get("nobs_amqp_publish_confirm_seconds_count", kind="task") == 5
    # Nothing a message carries becomes a label: not its id, not a task the project does not know.
    labels = {v for metric in registry.collect() for s in metric.samples for v in s.labels.values()}
    assert not {"evil-id", "os:system"} & labels


async def test_health_answers_while_a_task_blocks_the_loop_and_after_the_consumer_stops(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry=registry, max_blocked=0.5)
    worker = Worker(f"metrics-{key()[:8]}")
    project = Project(PROJECT, [worker], packages=["tests"], url=f"memory://{key()}", observers=[metrics])
    port = free_port()
    seen: list[tuple[int, dict[str, Any]]] = []

    def poll_while_blocked() -> None:  # in a thread: the loop it would need is the one that is blocked
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status, body = fetch(port, "/livez")
            seen.append((status, orjson.loads(body)))
            if status == 503:
                return
            time.sleep(0.05)

    with metrics.serve(port=port, host="127.0.0.1"):
        assert (await health(port))[0] == 503  # nothing consumes yet
        async with project, project.consuming(worker):
            status, report = await health(port)
            assert (status, report["state"], report["workers"]) == (200, READY, {worker.name: READY})
            poller = threading.Thread(target=poll_while_blocked)
            poller.start()
            await worker.queue(tasks.block_loop, tasks.FileJob(folder=str(tmp_path), key="block", sleep=2))
            await asyncio.to_thread(poller.join, 15)
            assert seen and seen[-1][0] == 503, seen
            assert seen[-1][1]["blocked_seconds"] >= 0.5 and seen[-1][1]["live"] is False
            assert await eventually(lambda: answers(port, "/livez", 200), timeout=5)
            assert value(await scrape(port), "nobs_amqp_event_loop_blocked_seconds") < 0.5
        status, report = await health(port)
        assert (status, report["state"]) == (503, STOPPED)
        assert (await health(port, "/livez"))[0] == 200  # stopped, not dead
        missing, _ = await asyncio.to_thread(fetch, port, "/nothing")
        assert missing == 404


def test_children_health_from_their_reports(tmp_path: Path) -> None:
    children = Children(tmp_path, 3, worker="w", max_blocked=5)
    now = time.time()
    fresh = {"state": READY, "workers": {"w": READY}, "connection": "up", "blocked_seconds": 0.0}
    (tmp_path / "health.11.json").write_bytes(orjson.dumps({**fresh, "pid": 11, "written_at": now}))
    (tmp_path / "health.12.json").write_bytes(orjson.dumps({**fresh, "pid": 12, "written_at": now}))
    report = children.report()
    assert (report["ready"], report["live"], report["state"]) == (False, True, "starting")  # one of three is missing
    (tmp_path / "health.13.json").write_bytes(orjson.dumps({**fresh, "pid": 13, "written_at": now}))
    assert children.report()["ready"] is True
    blocked = {**fresh, "pid": 12, "written_at": now, "blocked_seconds": 7.5}
    (tmp_path / "health.12.json").write_bytes(orjson.dumps(blocked))
    report = children.report()
    assert report["live"] is False and report["blocked_seconds"] == 7.5
    assert [p["live"] for p in report["processes"]] == [True, False, True]
    stale = {**fresh, "pid": 13, "written_at": now - STALE_SECONDS - 1}
    (tmp_path / "health.13.json").write_bytes(orjson.dumps(stale))
    (tmp_path / "health.12.json").write_bytes(orjson.dumps({**fresh, "pid": 12, "written_at": now, "state": DRAINING}))
    report = children.report()
    assert (report["live"], report["ready"], report["state"]) == (False, False, "unresponsive")
    children.exited(13)
    assert not (tmp_path / "health.13.json").exists() and children.report()["restarts"] == 1


def test_consume_serves_the_projects_own_metrics_rather_than_count_twice() -> None:
    registry = CollectorRegistry()
    own = PrometheusMetrics(registry=registry)
    observers: list[Observer] = [own]
    port = free_port()
    with exporting(observers, host="127.0.0.1", port=port, directory=None, max_blocked=3):
        assert observers == [own] and own.health.max_blocked == 3
        status, body = fetch(port, "/metrics")
        assert status == 200 and b"nobs_amqp_reconnects_total" in body
    assert observers == [own]
    fresh: list[Observer] = []
    with exporting(fresh, host="127.0.0.1", port=port, directory=None, max_blocked=3):
        [added] = fresh
        assert isinstance(added, PrometheusMetrics)
    assert fresh == []


def test_a_supervisor_removes_the_folders_that_killed_supervisors_left(tmp_path: Path) -> None:
    gone = _exited_pid()
    (tmp_path / f"{FOLDER_PREFIX}{gone}-abc").mkdir()
    (tmp_path / f"{FOLDER_PREFIX}{os.getpid()}-def").mkdir()
    remove_orphan_folders(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [f"{FOLDER_PREFIX}{os.getpid()}-def"]


def _exited_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


async def test_a_port_in_use_fails_consume_at_start() -> None:
    env = {"NOBS_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/", "NOBS_TEST_WORKER": "w"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for processes in ("1", "2"):
            code, text = await run_cli(
                *("--app", "tests.apps.cli_app:project", "consume", "w", "--processes", processes),
                *("--metrics-host", "127.0.0.1", "--metrics-port", str(port)),
                env=env,
            )
            assert code == 1, text
            assert f"cannot serve metrics on 127.0.0.1:{port}: address already in use" in text, text
            assert "Traceback" not in text and "started" not in text, text


def metrics_folder(pid: int) -> Path:
    """The supervisor's metrics folder, from the command line of its child `pid`."""
    arguments = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    return Path(next(a for a in arguments if a.startswith("--metrics-dir=")).partition("=")[2])


# -- RabbitMQ: nobs-amqp consume --metrics-port ----------------------------------------------------


def producer(name: str) -> tuple[Project, Worker]:
    worker = Worker(name)
    return Project(PROJECT, [worker], packages=["tests"]), worker


@pytest.mark.rabbitmq
@pytest.mark.timeout(60)
async def test_a_cli_worker_serves_counts_of_what_ran_and_drains_unready(
    amqp_url: str, name: str, broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOBS_TEST_MAX_ATTEMPTS", "2")
    port, log = free_port(), tmp_path / "worker.log"
    metrics = ("--metrics-port", str(port), "--metrics-host", "127.0.0.1")
    project, worker = producer(name)
    with worker_process(amqp_url, name, log, *metrics) as proc:
        await eventually(lambda: answers(port, "/readyz", 200, state=READY, workers={name: READY}), timeout=20)
        async with project:
            for _ in range(3):
                await worker.queue(tasks.record, tasks.Job(key=key()))
            await worker.queue(tasks.record, tasks.Job(key=key(), fail_times=1))
            await worker.queue(tasks.reject, tasks.Job(key=key()))
            await broker.publish_raw(name, b"{}", type="os:system", message_id="evil-id")

            async def counted() -> Samples | None:
                samples = await scrape(port)
                ended = value(samples, "nobs_amqp_deliveries_total", worker=name, outcome="succeeded") == 4
                ended &= value(samples, "nobs_amqp_deliveries_total", worker=name, outcome="dead_lettered") == 2
                return samples if ended else None

            samples = await eventually(counted, timeout=20)
            assert value(samples, "nobs_amqp_tasks_started_total", worker=name, task=RECORD) == 5
            assert value(samples, "nobs_amqp_tasks_failed_total", worker=name, task=RECORD) == 1
            assert value(samples, "nobs_amqp_tasks_retried_total", worker=name, task=RECORD) == 1
            assert value(samples, "nobs_amqp_tasks_started_total", worker=name, task=REJECT) == 1
            dead = "nobs_amqp_tasks_dead_lettered_total"
            assert value(samples, dead, worker=name, task=REJECT, reason="rejected") == 1
            assert value(samples, dead, worker=name, task="unknown", reason="unknown_task") == 1
            assert value(samples, "nobs_amqp_task_duration_seconds_count", worker=name, task=RECORD) == 5
            assert value(samples, "nobs_amqp_messages_published_total", worker=name, kind="retry") == 1
            assert value(samples, "nobs_amqp_messages_published_total", worker=name, kind="dead_letter") == 2
            assert value(samples, "nobs_amqp_tasks_in_flight", worker=name) == 0
            assert value(samples, "nobs_amqp_messages_held", worker=name) == 0
            assert value(samples, "nobs_amqp_consumer_state", worker=name, state="ready") == 1
            assert ("process_resident_memory_bytes", frozenset()) in samples  # the process's own, beside them
            assert not any("evil-id" in dict(labels).values() for _, labels in samples)

            # SIGTERM: not ready while the running task finishes, still live; then exit 0.
            await worker.queue(tasks.slow_file, tasks.FileJob(folder=str(tmp_path), key="slow", sleep=3))
            await eventually(lambda: pids(tmp_path, "slow", "start"), timeout=10)
            assert value(await scrape(port), "nobs_amqp_tasks_in_flight", worker=name) == 1
            proc.send_signal(signal.SIGTERM)
            report = await eventually(lambda: answers(port, "/readyz", 503, state=DRAINING), timeout=5)
            assert report["workers"] == {name: DRAINING}
            assert (await health(port, "/livez"))[0] == 200
            assert await exit_code(proc, log, 15) == 0, output(log)
    assert pids(tmp_path, "slow", "done") == [proc.pid]


@pytest.mark.rabbitmq
@pytest.mark.timeout(60)
async def test_processes_2_serve_their_metrics_and_health_as_one(
    amqp_url: str, name: str, broker: Broker, tmp_path: Path
) -> None:
    port, log = free_port(), tmp_path / "worker.log"
    options = ("--processes", "2", "--concurrency", "1", "--max-blocked", "1")
    options += ("--metrics-port", str(port), "--metrics-host", "127.0.0.1")
    project, worker = producer(name)
    with worker_process(amqp_url, name, log, *options, concurrency=1, new_session=True) as proc:
        report = await eventually(lambda: answers(port, "/readyz", 200, state=READY), timeout=30)
        first = sorted(p["pid"] for p in report["processes"])
        assert len(first) == 2 and report["expected_processes"] == 2, report
        folder = metrics_folder(first[0])
        async with project:
            for i in range(6):
                await worker.queue(tasks.slow_file, tasks.FileJob(folder=str(tmp_path), key=f"t{i}", sleep=0.3))
            await worker.queue(tasks.reject, tasks.Job(key=key()))

            async def counted() -> Samples | None:
                samples = await scrape(port)
                ended = value(samples, "nobs_amqp_tasks_succeeded_total", worker=name, task=SLOW) == 6
                ended &= value(samples, "nobs_amqp_deliveries_total", worker=name, outcome="dead_lettered") == 1
                return samples if ended else None

            samples = await eventually(counted, timeout=20)
        ran_in = {pid for i in range(6) for pid in pids(tmp_path, f"t{i}", "done")}
        assert ran_in == set(first), f"both processes ran tasks: {ran_in} vs {first}"
        assert value(samples, "nobs_amqp_tasks_started_total", worker=name, task=SLOW) == 6
        assert value(samples, "nobs_amqp_task_duration_seconds_count", worker=name, task=SLOW) == 6
        assert value(samples, "nobs_amqp_tasks_dead_lettered_total", worker=name, task=REJECT, reason="rejected") == 1
        assert value(samples, "nobs_amqp_consumer_state", worker=name, state="ready") == 2
        assert value(samples, "nobs_amqp_tasks_in_flight", worker=name) == 0

        # A task that blocks one child's event loop: that child is not live, the other one is.
        async with project:
            await worker.queue(tasks.block_loop, tasks.FileJob(folder=str(tmp_path), key="block", sleep=2.5))
        report = await eventually(lambda: answers(port, "/livez", 503), timeout=10)
        [blocker] = pids(tmp_path, "block", "start")
        assert {p["pid"]: p["live"] for p in report["processes"]} == {pid: pid != blocker for pid in first}, report
        assert report["blocked_seconds"] >= 1 and report["state"] == READY, report
        await eventually(lambda: answers(port, "/livez", 200), timeout=10)

        # A child killed: not ready until its replacement is; its counts stay.
        os.kill(first[0], signal.SIGKILL)
        await eventually(lambda: answers(port, "/readyz", 503), timeout=5)
        report = await eventually(lambda: answers(port, "/readyz", 200, restarts=1), timeout=20)
        assert first[0] not in {p["pid"] for p in report["processes"]} and len(report["processes"]) == 2
        samples = await scrape(port)
        assert value(samples, "nobs_amqp_tasks_started_total", worker=name, task=SLOW) == 6
        assert value(samples, "nobs_amqp_process_restarts_total", worker=name) == 1
        assert value(samples, "nobs_amqp_consumer_state", worker=name, state="ready") == 2
        assert (await health(port, "/livez"))[0] == 200

        proc.send_signal(signal.SIGTERM)
        assert await exit_code(proc, log, 20) == 0, output(log)
    assert not folder.exists(), "the supervisor left its metrics folder behind"


# -- RabbitMQ: in this process, a lost connection -------------------------------------------------


@pytest.mark.timeout(60)
async def test_not_ready_while_reconnecting_and_producer_metrics(amqp_url: str, name: str) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry=registry)
    port = free_port()
    async with Proxy() as proxy:
        worker = Worker(name)
        project = Project(PROJECT, [worker], packages=["tests"], url=proxy.url_for(amqp_url), observers=[metrics])
        with metrics.serve(port=port, host="127.0.0.1"):
            async with project, project.consuming(worker):
                assert await answers(port, "/readyz", 200, connection="up")
                proxy.refusing = True
                assert proxy.cut() >= 1
                report = await eventually(lambda: answers(port, "/readyz", 503), timeout=5)
                assert (report["state"], report["connection"], report["live"]) == ("reconnecting", "down", True)
                assert value(await scrape(port), "nobs_amqp_consumer_state", worker=name, state="reconnecting") == 1
                proxy.refusing = False
                await eventually(lambda: answers(port, "/readyz", 200, state=READY), timeout=15)
                for _ in range(3):
                    await worker.queue(tasks.record, tasks.Job(key=key()))
                succeeded = {"worker": name, "task": RECORD}
                await eventually(lambda: registry.get_sample_value("nobs_amqp_tasks_succeeded_total", succeeded) == 3)
    samples = collected(registry)
    assert value(samples, "nobs_amqp_reconnects_total") == 1
    assert value(samples, "nobs_amqp_messages_published_total", worker=name, kind="task") == 3
    assert value(samples, "nobs_amqp_publish_confirm_seconds_count", worker=name, kind="task") == 3
    assert value(samples, "nobs_amqp_consumer_state", worker=name, state="stopped") == 1


def collected(registry: CollectorRegistry) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in registry.collect()
        for sample in family.samples
    }
