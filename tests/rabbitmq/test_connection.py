"""The connection to the broker (issue 8): a first queue() while the broker is away, reconnecting
quietly with backoff, and stopping a worker at once on a second signal; and (issue 17) a project
that cannot open leaves no connection behind.

The broker is made unreachable through a local TCP proxy (tests/proxy.py); the shared broker
is never touched.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import aio_pika
import pytest

from nobs_amqp import BrokerUnavailableError, ConfigurationError, Project, Worker
from nobs_amqp import project as project_module
from nobs_amqp.management import Management
from nobs_amqp.transports.amqp.failover import RECONNECT_MAX_SECONDS
from nobs_amqp.urls import parse

from ..apps import tasks
from ..proxy import Proxy
from ..support import APP, ROOT, Broker, count_is, eventually, exit_code, output, pids, run_cli, worker_process

PROJECT = "nobs-test"


def make(name: str, url: str, **options: float) -> tuple[Project, Worker]:
    worker = Worker(name)
    return Project(name=PROJECT, workers=[worker], url=url, packages=["tests"], **options), worker


def job() -> tasks.Job:
    return tasks.Job(key=f"conn-{uuid.uuid4().hex[:8]}")


# -- bug 1: the first queue() of a process while the broker is away ---------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("delay", [None, 2], ids=["now", "delayed"])
async def test_first_queue_waits_for_an_unreachable_broker_then_raises_broker_unavailable(
    amqp_url: str, name: str, delay: int | None
) -> None:
    async with Proxy() as proxy:
        project, worker = make(name, proxy.url_for(amqp_url), publish_timeout=3)
        async with project:
            proxy.refusing = True
            assert proxy.cut() >= 1
            started = time.monotonic()
            with pytest.raises(BrokerUnavailableError) as raised:
                await worker.queue(tasks.record, job(), delay=delay)
            took = time.monotonic() - started
    assert 2.5 <= took < 6, f"queue() gave up after {took:.1f} s with publish_timeout=3"
    assert "unreachable for 3 s" in str(raised.value), str(raised.value)
    assert proxy.refused >= 1, "it never tried to reconnect"


@pytest.mark.timeout(40)
@pytest.mark.parametrize("delay", [None, 1], ids=["now", "delayed"])
async def test_first_queue_succeeds_when_the_broker_comes_back_within_the_timeout(
    amqp_url: str, name: str, broker: Broker, delay: int | None
) -> None:
    async with Proxy() as proxy:
        project, worker = make(name, proxy.url_for(amqp_url), publish_timeout=15)
        async with project:
            proxy.refusing = True
            assert proxy.cut() >= 1
            sending = asyncio.create_task(worker.queue(tasks.record, job(), delay=delay))
            try:
                await eventually(lambda: proxy.refused >= 2, timeout=10)
                assert not sending.done(), "queue() returned while the broker was unreachable"
            finally:
                proxy.refusing = False
            message_id = await asyncio.wait_for(sending, 15)
    [message] = await broker.take(name, timeout=15)
    assert message.message_id == message_id


# -- bug 6: reconnecting, logged once, with backoff -------------------------------------------


@pytest.mark.timeout(40)
async def test_reconnect_backs_off_and_logs_the_outage_once(
    amqp_url: str, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nobs_amqp")
    async with Proxy() as proxy:
        project, worker = make(name, proxy.url_for(amqp_url), publish_timeout=20)
        async with project:
            await worker.queue(tasks.record, job())
            proxy.refusing = True
            assert proxy.cut() >= 1
            await asyncio.sleep(7)  # the outage: attempts at 0, then after 0.5, 1, 2, 3, 3 s, each less up to half
            attempts = proxy.refused
            proxy.refusing = False
            await asyncio.wait_for(worker.queue(tasks.record, job()), 15)  # back within one backoff step

            # Reconnected: the backoff starts again from 0.5 s.
            proxy.refusing = True
            before = proxy.refused
            assert proxy.cut() >= 1
            await eventually(lambda: proxy.refused - before >= 3, timeout=3)
            proxy.refusing = False
            await asyncio.wait_for(worker.queue(tasks.record, job()), 15)
    assert 3 <= attempts <= 7, f"{attempts} reconnection attempts in a 7 s outage (every 0.5 s would be 15)"
    lines = [r.getMessage() for r in caplog.records if r.name == "nobs_amqp" and r.levelno >= logging.WARNING]
    assert sum("lost the connection" in line for line in lines) == 2, lines
    back = [line for line in lines if line.startswith("reconnected")]
    assert len(back) == 2, lines
    outage = re.search(r" after ([\d.]+) s", back[0])
    assert outage is not None and 6.5 <= float(outage.group(1)) <= 7 + RECONNECT_MAX_SECONDS + 0.5, back[0]
    assert len(lines) == 4, lines


@pytest.mark.timeout(60)
async def test_a_cli_worker_logs_an_outage_in_two_lines(
    amqp_url: str, name: str, broker: Broker, tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    async with Proxy() as proxy:
        with worker_process(proxy.url_for(amqp_url), name, log) as proc:
            project, worker = make(name, amqp_url)
            async with project:
                await worker.queue(tasks.slow_file, tasks.FileJob(folder=str(tmp_path), key="a"))
                await eventually(lambda: "succeeded in" in output(log), timeout=15)  # done, and its line logged
                start = len(log.read_bytes())
                proxy.refusing = True
                assert proxy.cut() >= 1
                await asyncio.sleep(4)  # the outage
                proxy.refusing = False
                await eventually(lambda: "reconnected" in output(log), timeout=15)
                await worker.queue(tasks.slow_file, tasks.FileJob(folder=str(tmp_path), key="b"))
                await eventually(lambda: pids(tmp_path, "b", "done"), timeout=15)
            proc.send_signal(signal.SIGTERM)
            assert await exit_code(proc, log, 15) == 0, output(log)
    during = log.read_bytes()[start:].decode(errors="replace").splitlines()
    text = "\n".join(during)
    back = next(i for i, line in enumerate(during) if "reconnected" in line)
    outage = during[: back + 1]
    # Besides the two lines, one INFO line per failed attempt, at most the batched ack of task a,
    # lost in the cut, and its redelivery acked without running it again (which may land before
    # the reconnect line).
    attempts = [line for line in outage if " INFO " in line and "reconnecting: " in line and " did not answer " in line]
    consequences = ("ack(s) not sent", "already settled here")
    assert len([line for line in outage if not any(c in line for c in consequences)]) == 2 + len(attempts), text
    assert 2 <= len(attempts) <= 7, text
    assert len(outage) <= 4 + len(attempts), text
    assert sum("lost the connection" in line for line in outage) == 1, text
    assert " after " in outage[-1], text
    assert all(" nobs_amqp: " in line for line in during), text
    assert not any(" ERROR " in line or "Traceback" in line for line in during), text


# -- bug 7: a second signal stops the worker at once ------------------------------------------


@pytest.mark.timeout(60)
async def test_a_second_sigint_stops_at_once_and_returns_the_running_message(
    amqp_url: str, name: str, broker: Broker, tmp_path: Path
) -> None:
    project, worker = make(name, amqp_url)
    async with project:
        await worker.queue(tasks.slow_file, tasks.FileJob(folder=str(tmp_path), key="s", sleep=30))
    log = tmp_path / "worker.log"
    with worker_process(amqp_url, name, log) as proc:
        await eventually(lambda: pids(tmp_path, "s", "start"), timeout=15)
        proc.send_signal(signal.SIGINT)
        await eventually(lambda: "a second SIGINT" in output(log), timeout=5)
        await asyncio.sleep(1)  # a person pressing Ctrl-C a second time
        assert proc.poll() is None, "the first SIGINT did not wait for the running task"
        signalled = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = await exit_code(proc, log, 10)
        took = time.monotonic() - signalled
    text = output(log)
    assert code == 0, text
    assert took < 3, f"took {took:.1f} s after the second SIGINT; log:\n{text}"
    assert "up to 25 s" in text, text
    assert pids(tmp_path, "s", "done") == []
    await eventually(lambda: count_is(broker, name, 1), timeout=10)
    assert await broker.count(f"{name}.dlq") == 0


@pytest.mark.timeout(60)
async def test_sigterm_while_processes_start_is_a_clean_stop(amqp_url: str, name: str, tmp_path: Path) -> None:
    """A deploy that stops the service just after it started: the children get SIGTERM before
    they set up their handler. They held nothing, so that is a clean stop: exit code 0."""
    log = tmp_path / "worker.log"
    with worker_process(amqp_url, name, log, "--processes", "2") as proc:
        await eventually(lambda: "started 2 worker processes" in output(log), timeout=20, interval=0.01)
        proc.send_signal(signal.SIGTERM)
        code = await exit_code(proc, log, 20)
    text = output(log)
    assert code == 0, text
    assert "Traceback" not in text, text


@pytest.mark.timeout(60)
async def test_ctrl_c_under_processes_drains_and_a_second_one_stops_at_once(
    amqp_url: str, name: str, broker: Broker, tmp_path: Path
) -> None:
    """Ctrl-C in a terminal signals the whole process group: a `--processes` child gets each one
    twice, from the terminal and from its supervisor. That is still one Ctrl-C: it drains."""
    project, worker = make(name, amqp_url)
    async with project:
        await worker.queue(tasks.slow_file, tasks.FileJob(folder=str(tmp_path), key="p", sleep=30))
    log = tmp_path / "worker.log"
    # `nobs-amqp consume` as the leader of its own process group, as a shell runs it.
    with worker_process(amqp_url, name, log, "--processes", "2", new_session=True) as proc:
        await eventually(lambda: output(log).count("consuming") == 2, timeout=20)  # both children
        await eventually(lambda: pids(tmp_path, "p", "start"), timeout=20)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
        await eventually(lambda: output(log).count("a second SIGINT") == 2, timeout=5)
        await asyncio.sleep(1)  # a person pressing Ctrl-C a second time
        assert proc.poll() is None, f"one Ctrl-C did not wait for the running task; log:\n{output(log)}"
        signalled = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        code = await exit_code(proc, log, 10)
        took = time.monotonic() - signalled
    text = output(log)
    assert code == 0, text
    assert took < 4, f"took {took:.1f} s after the second Ctrl-C; log:\n{text}"
    assert pids(tmp_path, "p", "done") == []
    await eventually(lambda: count_is(broker, name, 1), timeout=10)


# -- a configuration error after connecting (issue 17, item 9) ---------------------------------


async def project_connections(amqp_url: str, project: str) -> list[str] | None:
    """The names of the connections of `project` the management API lists in the URL's vhost;
    None until it lists the control connection `control <project>` (opened after the project's
    tries), so that an empty list is known to be the broker's word and not its statistics' lag."""
    vhost = quote(parse(amqp_url).vhost, safe="")
    listed = await Management(amqp_url).request("GET", f"/api/vhosts/{vhost}/connections?columns=client_properties")
    names = [str((c.get("client_properties") or {}).get("connection_name", "")) for c in listed or []]
    if f"control {project}" not in names:
        return None
    return [n for n in names if n.startswith(f"nobs-amqp {project} ")]


@pytest.mark.timeout(40)
async def test_open_with_an_invalid_signing_key_leaves_no_connection(
    amqp_url: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOBS_AMQP_SIGNING_KEY", "too short")
    project = Project(name, workers=[Worker(name)], packages=["tests.apps"], url=amqp_url)
    for _ in range(3):
        with pytest.raises(ConfigurationError, match="a signing key must have at least 16 bytes"):
            await project.open()
        assert not project.is_open
    monkeypatch.delenv("NOBS_AMQP_SIGNING_KEY")

    def broken_session(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a session that fails once connected")

    monkeypatch.setattr(project_module, "Session", broken_session)  # anything failing after the connection opened
    with pytest.raises(RuntimeError, match="fails once connected"):
        await project.open()
    assert not project.is_open
    control = await aio_pika.connect(amqp_url, client_properties={"connection_name": f"control {name}"})
    seen: list[list[str] | None] = []

    async def none_left() -> bool:
        seen.append(await project_connections(amqp_url, name))
        return seen[-1] == []

    try:
        await eventually(none_left, timeout=20, interval=0.25)
    except AssertionError:
        raise AssertionError(f"left open after 4 failed open(): {seen[-1]}") from None
    finally:
        await control.close()


@pytest.mark.timeout(40)
async def test_the_cli_says_a_bad_signing_key_once_in_json_and_nothing_else(amqp_url: str, name: str) -> None:
    env = {
        "NOBS_AMQP_URL": amqp_url,
        "NOBS_AMQP_SIGNING_KEY": "too short",
        "NOBS_TEST_WORKER": name,
        "PYTHONPATH": str(ROOT),
    }
    code, text = await run_cli("--log-format", "json", "--app", APP, "consume", name, env=env)
    assert code == 1, text
    lines = [json.loads(line) for line in text.splitlines()]  # every line is JSON
    assert [line["level"] for line in lines] == ["ERROR"], text
    assert "a signing key must have at least 16 bytes" in lines[0]["message"]
    for noise in ("reconnecting", "Event loop is closed", "Task was destroyed", "Traceback"):
        assert noise not in text
