"""`nobs-amqp consume` at start: it waits for a broker that does not answer (live, not ready) and
starts once it does; SIGTERM meanwhile exits 0; a refused login exits at once. `consume A B` runs
two workers in one process. `nobs-amqp schedule --metrics-port` serves its health."""

from __future__ import annotations

import asyncio
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest

from nobs_amqp import Project, Worker

from ..apps import tasks
from ..proxy import Proxy
from ..support import APP, ROOT, eventually, exit_code, free_port, output, pids, process, run_cli

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(60)]

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
PASSWORD = "s3cret-wait"


def fetch(port: int, path: str) -> tuple[int, dict[str, Any]] | None:
    """GET http://127.0.0.1:port/path: status and JSON body; None before anything listens."""
    try:
        with _NO_PROXY.open(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, orjson.loads(error.read())
    except urllib.error.URLError:
        return None


async def status(port: int, path: str) -> int | None:
    answer = await asyncio.to_thread(fetch, port, path)
    return None if answer is None else answer[0]


def consume(url: str, worker: str, log: Path, *options: str, app: str = APP) -> Any:
    """`nobs-amqp consume` in a subprocess of its own process group (see support.process)."""
    env = {"NOBS_AMQP_URL": url, "NOBS_TEST_WORKER": worker, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "nobs_amqp", "--app", app, "consume", *options]
    return process(command, env=env, log=log)


async def test_consume_waits_for_the_broker_then_consumes(amqp_url: str, name: str, tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "worker.log"
    async with Proxy() as proxy:
        proxy.refusing = True  # the broker is down: every connection is closed at once
        url = proxy.url_for(amqp_url)
        options = [name, "--metrics-port", str(port), "--metrics-host", "127.0.0.1"]
        with consume(url, name, log, *options) as worker:
            await logged(log, "waiting for the broker at 127.0.0.1:")
            assert await eventually(lambda: status(port, "/livez"), timeout=10) == 200  # live: not restarted
            assert await status(port, "/readyz") == 503  # not ready: no traffic, no rollout progress
            assert worker.poll() is None and proxy.refused >= 1
            assert output(log).count("waiting for the broker") == 1  # one warning, not one per attempt
            proxy.refusing = False  # the broker is back
            assert await eventually(lambda: answers_ready(port), timeout=20), output(log)
            project = Project("nobs-test", [Worker(name)], url=amqp_url, packages=["tests.apps"])
            async with project:
                await project.worker(name).queue(tasks.slow_file, tasks.FileJob(folder=str(tmp_path), key="k"))
            await eventually(lambda: pids(tmp_path, "k", "done") == [worker.pid], timeout=15)
            worker.send_signal(signal.SIGTERM)
            assert await exit_code(worker, log, 20) == 0, output(log)
    assert "answered after" in output(log)


async def logged(log: Path, text: str, timeout: float = 20) -> None:
    """Wait (bounded) for `text` in the log; fail with the log."""
    try:
        await eventually(lambda: text in output(log), timeout=timeout)
    except AssertionError:
        raise AssertionError(f"{text!r} not logged within {timeout} s:\n{output(log)}") from None


async def answers_ready(port: int) -> bool:
    return await status(port, "/readyz") == 200


async def test_sigterm_while_waiting_for_the_broker_exits_0_at_once(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    url = f"amqp://guest:{PASSWORD}@127.0.0.1:{free_port()}/"  # nothing listens there
    with consume(url, "nowhere", log, "nowhere") as worker:
        await logged(log, "waiting for the broker at 127.0.0.1:")
        worker.send_signal(signal.SIGTERM)
        assert await exit_code(worker, log, 5) == 0, output(log)
    assert PASSWORD not in output(log)


async def test_a_refused_login_fails_at_once_without_waiting(amqp_url: str, tmp_path: Path) -> None:
    wrong = amqp_url.replace("guest:guest@", "guest:not-the-password@")
    assert wrong != amqp_url
    code, text = await run_cli(
        "--app", APP, "consume", "refused", env={"NOBS_AMQP_URL": wrong, "NOBS_TEST_WORKER": "refused"}, timeout=20
    )
    assert code == 1, text
    assert "ACCESS_REFUSED" in text and "waiting for the broker" not in text
    assert "not-the-password" not in text


@pytest.mark.parametrize("processes", [1, 2])
async def test_one_consume_runs_two_workers(amqp_url: str, name: str, tmp_path: Path, processes: int) -> None:
    mail, hooks = Worker(f"{name}.mail"), Worker(f"{name}.hooks")
    project = Project("nobs-test", [mail, hooks], url=amqp_url, packages=["tests.apps"])
    try:
        async with project:
            for worker, key in ((mail, "mail"), (hooks, "hook")):
                for i in range(3):
                    await worker.queue(tasks.slow_file, tasks.FileJob(folder=str(tmp_path), key=f"{key}{i}"))
            env = {"NOBS_AMQP_URL": amqp_url, "NOBS_TEST_WORKER": name}
            options = ["--burst", "--processes", str(processes)]
            app = "tests.apps.two_workers:project"
            code, text = await run_cli("--app", app, "consume", mail.name, hooks.name, *options, env=env)
            assert code == 0, text
            keys = [f"{key}{i}" for key in ("mail", "hook") for i in range(3)]
            assert all(pids(tmp_path, key, "done") for key in keys), text
            if processes == 1:
                assert f"worker {mail.name}, {hooks.name}: stopped after 6 task(s)" in text
            assert await project.session.transport.message_count(mail.name) == 0
    finally:
        await delete_topology(project, mail.name, hooks.name)


async def delete_topology(project: Project, *queues: str) -> None:
    import aio_pika  # the test's own cleanup, as the `name` fixture does it

    assert project.urls
    connection = await aio_pika.connect(project.urls[0])
    try:
        channel = await connection.channel()
        for queue in queues:
            for each in (queue, f"{queue}.dlq"):
                await channel.queue_delete(each)
            await channel.exchange_delete(f"{queue}.dlx")
    finally:
        await connection.close()


async def test_consume_refuses_a_worker_given_twice() -> None:
    code, text = await run_cli("--app", APP, "consume", "a", "a", env={"NOBS_TEST_WORKER": "a"})
    assert code == 2 and "worker 'a' given more than once" in text, text


async def test_schedule_serves_its_health(amqp_url: str, tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "scheduler.log"
    command = [sys.executable, "-m", "nobs_amqp", "--app", "tests.apps.deploy_app:project", "schedule"]
    command += ["--metrics-port", str(port), "--metrics-host", "127.0.0.1"]
    with process(command, env={"NOBS_AMQP_URL": amqp_url, "PYTHONPATH": str(ROOT)}, log=log) as scheduler:
        assert await eventually(lambda: answers_ready(port), timeout=20), output(log)
        answer = await asyncio.to_thread(fetch, port, "/livez")
        assert answer is not None and answer[0] == 200 and answer[1]["workers"] == {"scheduler": "ready"}
        scheduler.send_signal(signal.SIGTERM)
        assert await exit_code(scheduler, log, 15) == 0, output(log)
