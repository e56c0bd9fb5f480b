"""Logs (issue 11, item 3): one line per finished delivery with its fields as `extra`, and
`--log-format json`: one JSON object a line, task lines with their fields, no password."""

from __future__ import annotations

import json
import logging
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import tenacity

from nobs_amqp import Project, Worker
from nobs_amqp.observe.logs import TASK_FIELDS
from nobs_amqp.testing import drain

from ..apps import tasks
from ..support import APP, ROOT, eventually, exit_code, output, process, publish_raw_message, run_cli

PROJECT = "nobs-test"


def key() -> str:
    return uuid.uuid4().hex


def task_records(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    return [r for r in records if r.name == "nobs_amqp" and hasattr(r, "outcome")]


@pytest.mark.timeout(30)
async def test_each_delivery_is_logged_once_with_its_fields(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nobs_amqp")
    worker = Worker("logged", stop=tenacity.stop_after_attempt(2), wait=tenacity.wait_fixed(3))
    url = f"memory://{key()}"
    project = Project(PROJECT, [worker], packages=["tests.apps"], modules=["tests.apps.tasks"], url=url)
    async with project:
        ok = await worker.queue(tasks.record, tasks.Job(key=key()))
        failing = await worker.queue(tasks.always_fail, tasks.Job(key=key()))
        rejected = await worker.queue(tasks.reject, tasks.Job(key=key()))
        await publish_raw_message(project, "logged", b"{}", "tests.apps.tasks:nope\nforged", message_id="unknown")
        await drain(project, timeout=20)

    lines = task_records(caplog.records)
    seen = sorted((r.message_id, r.attempt, r.outcome, r.levelname) for r in lines)  # type: ignore[attr-defined]
    assert seen == sorted(
        [
            (ok, 1, "succeeded", "INFO"),
            (failing, 1, "retried", "WARNING"),
            (failing, 2, "dead_lettered", "ERROR"),
            (rejected, 1, "dead_lettered", "ERROR"),
            ("unknown", 1, "dead_lettered", "ERROR"),
        ]
    )
    for record in lines:
        assert {f: getattr(record, f) for f in TASK_FIELDS}.keys() == set(TASK_FIELDS)
        assert record.worker == "logged" and record.duration >= 0  # type: ignore[attr-defined]
    by = {(r.message_id, r.attempt): r for r in lines}  # type: ignore[attr-defined]
    retried = by[failing, 1]
    assert retried.getMessage().startswith(f"task tests.apps.tasks:always_fail id {failing} attempt 1 failed (")
    assert retried.getMessage().endswith(f"(RuntimeError: {retried.error}); retry in 3 s")  # type: ignore[attr-defined]
    assert (retried.error_type, retried.retry_delay, retried.reason) == ("RuntimeError", 3, None)  # type: ignore[attr-defined]
    assert by[ok, 1].getMessage().startswith(f"task tests.apps.tasks:record id {ok} attempt 1 succeeded in ")
    assert by[ok, 1].error_type is None  # type: ignore[attr-defined]
    assert "dead-lettered to logged.dlq (max_attempts: boom" in by[failing, 2].getMessage()
    assert (by[rejected, 1].reason, by[rejected, 1].error_type) == ("rejected", "Reject")  # type: ignore[attr-defined]
    unknown = by["unknown", 1]
    assert (unknown.reason, unknown.error_type, unknown.duration) == ("unknown_task", "ForeignTaskError", 0)  # type: ignore[attr-defined]
    assert "\n" not in unknown.getMessage() and "\n" not in unknown.task  # type: ignore[attr-defined]
    # Nothing else logs a delivery's outcome: no line about these messages without the fields.
    others = [r.getMessage() for r in caplog.records if r not in lines]
    assert not [m for m in others if any(i in m for i in (ok, failing, rejected))], others


@pytest.mark.rabbitmq
@pytest.mark.timeout(60)
async def test_consume_with_json_logs_writes_one_json_object_a_line(amqp_url: str, name: str, tmp_path: Path) -> None:
    env = {
        "NOBS_AMQP_URL": amqp_url,
        "NOBS_TEST_WORKER": name,
        "NOBS_TEST_MAX_ATTEMPTS": "2",
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
    }
    log = tmp_path / "worker.log"
    project = Project(PROJECT, [worker := Worker(name)], packages=["tests.apps"], url=amqp_url)
    command = [sys.executable, "-m", "nobs_amqp", "--app", APP, "consume", name, "--log-format", "json"]
    async with project:
        ids = {
            "ok": await worker.queue(tasks.record, tasks.Job(key=key())),
            "failing": await worker.queue(tasks.always_fail, tasks.Job(key=key())),
            "rejected": await worker.queue(tasks.reject, tasks.Job(key=key())),
        }
        with process(command, env=env, log=log) as proc:
            await eventually(lambda: "max_attempts" in output(log), timeout=30, interval=0.1)
            proc.send_signal(signal.SIGTERM)
            assert await exit_code(proc, log, 20) == 0, output(log)

    text = log.read_text()
    assert text.strip(), "nothing was logged"
    lines: list[dict[str, Any]] = [json.loads(line) for line in text.splitlines()]  # every line is JSON
    assert all(list(line)[:4] == ["time", "level", "logger", "message"] for line in lines), lines
    assert all(line["time"].endswith("Z") for line in lines)
    assert any(line["message"].startswith(f"worker {name}: consuming") for line in lines)
    task_lines = [line for line in lines if "outcome" in line]
    found = sorted((line["message_id"], line["attempt"], line["outcome"], line["level"]) for line in task_lines)
    assert found == sorted(
        [
            (ids["ok"], 1, "succeeded", "INFO"),
            (ids["failing"], 1, "retried", "WARNING"),
            (ids["failing"], 2, "dead_lettered", "ERROR"),
            (ids["rejected"], 1, "dead_lettered", "ERROR"),
        ]
    )
    for line in task_lines:
        assert set(TASK_FIELDS) <= set(line) and line["worker"] == name and line["logger"] == "nobs_amqp"
        assert isinstance(line["duration"], float) and line["duration"] >= 0
    by = {(line["message_id"], line["attempt"]): line for line in task_lines}
    assert by[ids["ok"], 1]["task"] == "tests.apps.tasks:record" and by[ids["ok"], 1]["error_type"] is None
    assert by[ids["failing"], 1]["error_type"] == "RuntimeError" and by[ids["failing"], 1]["retry_delay"] >= 1
    assert by[ids["failing"], 2]["reason"] == "max_attempts"
    assert by[ids["rejected"], 1]["reason"] == "rejected" and by[ids["rejected"], 1]["error_type"] == "Reject"


@pytest.mark.timeout(30)
async def test_a_json_log_of_a_connection_failure_shows_no_password() -> None:
    env = {"NOBS_AMQP_URL": "amqp://guest:hunter2@127.0.0.1:1/", "NOBS_TEST_WORKER": "x"}
    # debug: aio-pika's and aiormq's own lines too, all of them
    code, text = await run_cli(
        "--app", APP, "consume", "x", "--start-timeout", "1.5", "--log-format", "json", "--log-level", "debug", env=env
    )
    assert code == 1, text
    assert "hunter2" not in text
    lines = [json.loads(line) for line in text.splitlines()]
    errors = [line["message"] for line in lines if line["level"] == "ERROR" and line["logger"] == "nobs_amqp"]
    assert any(m.startswith("cannot connect to amqp://guest:***@127.0.0.1:1/") for m in errors), text


def test_json_logs_without_the_library_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from nobs_amqp import ConfigurationError
    from nobs_amqp.observe import logs

    monkeypatch.setitem(sys.modules, "pythonjsonlogger", None)
    monkeypatch.setitem(sys.modules, "pythonjsonlogger.json", None)
    with pytest.raises(ConfigurationError, match=r"pip install 'nobs_amqp\[json-logs\]'"):
        logs.formatter("json")
    assert logs.formatter("text") is not None
