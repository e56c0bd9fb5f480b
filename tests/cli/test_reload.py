"""`consume --reload` (issue 10, item 5): a change to a *.py file of the project drains the running
workers and starts fresh ones with the new code; a syntax error, or a worker that cannot start,
waits for the next change; a signal stops the workers with the usual drain.

The app is a small package the tests write into a temporary folder and rewrite as a developer
would; its task leaves files named after the code's version and the worker's pid.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from nobs_amqp import ConfigurationError, Project
from nobs_amqp.cli.reload import SourceFilter, reloading, source_roots, syntax_error

from ..support import ROOT, Broker, count_is, eventually, exit_code, output, process, run_cli

APP = """
from nobs_amqp import Project, Worker

worker = Worker({name!r}, concurrency=2)
project = Project(name="nobs-test", workers=[worker], packages=[{package!r}])
"""

TASKS = """
import asyncio
import os
from pathlib import Path

from pydantic import BaseModel

VERSION = {version!r}


class Job(BaseModel):
    folder: str
    key: str
    sleep: float = 0.0


async def mark(job: Job) -> None:
    folder = Path(job.folder)
    (folder / f"{{job.key}}.start.{{VERSION}}.{{os.getpid()}}").touch()
    await asyncio.sleep(job.sleep)
    (folder / f"{{job.key}}.done.{{VERSION}}.{{os.getpid()}}").touch()
"""


@dataclass
class App:
    """The temporary app: its package folder, where its tasks leave marks, the log of its worker."""

    name: str
    package: str
    folder: Path
    marks: Path
    log: Path

    def write(self, module: str, text: str) -> None:
        (self.folder / f"{module}.py").write_text(textwrap.dedent(text))

    def tasks(self, version: str) -> None:
        self.write("tasks", TASKS.format(version=version))

    def module(self, module: str) -> ModuleType:
        return importlib.import_module(f"{self.package}.{module}")

    async def queue(self, key: str, sleep: float = 0.0) -> None:
        app, tasks = self.module("app"), self.module("tasks")
        project: Project = app.project
        async with project:
            await app.worker.queue(tasks.mark, tasks.Job(folder=str(self.marks), key=key, sleep=sleep))

    def ran(self, key: str) -> list[tuple[str, str, int]]:
        """(start|done, version, pid) of each mark task `key` left, sorted."""
        found = (p.name.split(".") for p in self.marks.glob(f"{key}.*"))
        return sorted((what, version, int(pid)) for _, what, version, pid in found)

    def reloading(self, amqp_url: str, *options: str) -> AbstractContextManager[subprocess.Popen[bytes]]:
        """`nobs-amqp consume NAME --reload *options` on this app, leading its own process group."""
        command = [sys.executable, "-m", "nobs_amqp", "--app", f"{self.package}.app:project", "consume", self.name]
        env = {"NOBS_AMQP_URL": amqp_url, "PYTHONPATH": os.pathsep.join([str(self.folder.parent), str(ROOT)])}
        return process([*command, "--reload", *options], env=env, log=self.log)


@pytest.fixture
def app(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[App]:
    package = f"reload_app_{uuid.uuid4().hex[:8]}"
    folder = tmp_path / "src" / package
    folder.mkdir(parents=True)
    (tmp_path / "marks").mkdir()
    made = App(name, package, folder, tmp_path / "marks", tmp_path / "reload.log")
    made.write("__init__", "")
    made.write("app", APP.format(name=name, package=package))
    made.tasks("first")
    monkeypatch.syspath_prepend(str(folder.parent))
    made.module("tasks")  # the version this process queues with: only its name and payload type matter
    yield made
    for module in [m for m in sys.modules if m == package or m.startswith(f"{package}.")]:
        del sys.modules[module]


STARTED = r"reload: started (?:the worker \(pid (\d+)\)|\d+ worker processes \(pids \[([\d, ]+)\]\))"


def started(log: Path) -> list[list[int]]:
    """The pids of each generation of workers the reloader started, in order."""
    found = re.findall(
        r"reload: started (?:the worker \(pid (\d+)\)|\d+ worker processes \(pids \[([\d, ]+)\]\))", output(log)
    )
    return [[int(pid) for pid in (one or many).split(", ")] for one, many in found]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.rabbitmq
@pytest.mark.timeout(60)
async def test_a_change_drains_the_running_task_then_the_new_code_runs_in_every_process(
    app: App, amqp_url: str, broker: Broker
) -> None:
    with app.reloading(amqp_url, "--processes", "2", "--grace-period", "10") as proc:
        await eventually(lambda: output(app.log).count("consuming") == 2, timeout=20)
        [first] = started(app.log)
        await app.queue("a", sleep=2.5)
        await eventually(lambda: app.ran("a"), timeout=10)
        app.tasks("second")
        await asyncio.sleep(0.2)  # an editor or a formatter saving a second time: the same restart
        app.tasks("second")
        await eventually(lambda: "tasks.py changed; restarting 2 worker processes" in output(app.log), timeout=10)
        await eventually(lambda: output(app.log).count("consuming") == 4, timeout=20)
        _, second = started(app.log)
        await app.queue("b")
        await eventually(lambda: [pid for what, version, pid in app.ran("b") if (what, version) == ("done", "second")])
        [(_, _, ran_b), _] = app.ran("b")
        assert ran_b in second
        proc.send_signal(signal.SIGTERM)
        code = await exit_code(proc, app.log, 15)
    text = output(app.log)
    assert code == 0, text
    [(_, _, pid), _] = app.ran("a")
    assert pid in first
    assert app.ran("a") == [("done", "first", pid), ("start", "first", pid)], "the running task was cut or run again"
    assert text.count("changed; restarting") == 1, text
    assert len(started(app.log)) == 2, text
    assert "reload: stopped" in text
    assert all(gone(pid) for pid in first + second)
    assert await broker.count(app.name) == 0
    assert await broker.count(f"{app.name}.dlq") == 0


@pytest.mark.rabbitmq
@pytest.mark.timeout(60)
async def test_a_broken_change_waits_for_the_fix_and_a_second_signal_stops_at_once(
    app: App, amqp_url: str, broker: Broker
) -> None:
    with app.reloading(amqp_url) as proc:
        await eventually(lambda: "consuming" in output(app.log), timeout=20)
        [[first]] = started(app.log)

        # A syntax error: the worker drains and stops, and no new one starts.
        app.write("tasks", TASKS.format(version="second") + "\ndef broken(:\n")
        await eventually(lambda: "syntax error in " in output(app.log), timeout=10)
        assert gone(first), "the worker still runs the old code"
        await app.queue("c")
        await eventually(lambda: count_is(broker, app.name, 1), timeout=5)

        # Fixed, but the app module now fails at import: the worker starts, exits, is not started again.
        app.write("app", APP.format(name=app.name, package=app.package) + "\nraise RuntimeError('half-written')\n")
        app.tasks("second")
        await eventually(
            lambda: "exited with code 1; it starts again at the next change" in output(app.log), timeout=20
        )
        app.write("app", APP.format(name=app.name, package=app.package))
        await eventually(
            lambda: ("done", "second") in [(what, version) for what, version, _ in app.ran("c")], timeout=20
        )
        assert len(started(app.log)) == 3, output(app.log)
        assert proc.poll() is None

        # Ctrl-C, to the process group as a terminal sends it, drains (a task is running); a second one stops at once.
        await app.queue("d", sleep=30)
        await eventually(lambda: app.ran("d"), timeout=10)
        os.killpg(proc.pid, signal.SIGINT)
        await eventually(lambda: "a second SIGINT" in output(app.log), timeout=5)
        await asyncio.sleep(0.7)  # a second Ctrl-C, later than the same one delivered twice
        assert proc.poll() is None, "the first SIGINT did not wait for the running task"
        os.killpg(proc.pid, signal.SIGINT)
        code = await exit_code(proc, app.log, 5)
    text = output(app.log)
    assert code == 0, text
    assert "syntax error in " in text and "tasks.py line " in text, text
    assert [what for what, _, _ in app.ran("d")] == ["start"]
    await eventually(lambda: count_is(broker, app.name, 1), timeout=10)
    assert await broker.count(f"{app.name}.dlq") == 0


@pytest.mark.timeout(30)
async def test_burst_and_reload_together_are_a_usage_error() -> None:
    code, text = await run_cli("consume", "w", "--burst", "--reload", env={"NOBS_AMQP_URL": "memory://"})
    assert code == 2, text
    assert "--burst exits once the queue is empty, --reload restarts the worker: use one of them" in text


@pytest.mark.timeout(10)
def test_only_python_sources_of_the_project_are_watched(tmp_path: Path) -> None:
    root = tmp_path / ".hidden" / "project"  # a project inside a hidden folder is still watched
    wanted = SourceFilter([root])
    assert wanted(None, str(root / "app.py"))
    assert wanted(None, str(root / "pkg" / "deep" / "tasks.py"))
    for ignored in (".venv/lib/x.py", "venv/x.py", "pkg/__pycache__/x.py", ".git/x.py", "pkg/.cache/x.py", "x.txt"):
        assert not wanted(None, str(root / ignored)), ignored
    assert not wanted(None, str(root / "pkg" / "flycheck_tasks.py"))
    assert not wanted(None, str(tmp_path / "elsewhere.py"))


@pytest.mark.timeout(10)
def test_the_watched_folders_are_the_apps_package_and_the_projects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    suffix = uuid.uuid4().hex[:8]
    app_package, other = tmp_path / "src" / f"roots_app_{suffix}", tmp_path / "lib"
    (app_package / "sub").mkdir(parents=True)
    (app_package / "__init__.py").write_text("")
    other.mkdir()
    (other / f"roots_tasks_{suffix}.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    monkeypatch.syspath_prepend(str(other))
    project = Project(name="roots", packages=[f"roots_app_{suffix}.sub", f"roots_tasks_{suffix}"])
    reference = f"roots_app_{suffix}.sub.app:project"
    assert source_roots(project, reference, []) == [other.resolve(), app_package.resolve()]
    # Named in a pyproject.toml: its folder, which holds the rest.
    assert source_roots(project, reference, [str(tmp_path)]) == [tmp_path.resolve()]


@pytest.mark.timeout(10)
def test_a_syntax_error_is_named_by_file_and_line(tmp_path: Path) -> None:
    source = tmp_path / "tasks.py"
    source.write_text("x = 1\ndef broken(:\n")
    assert syntax_error(source) == f"{source} line 2: invalid syntax"
    source.write_text("x = '\\d'\n")  # a SyntaxWarning only
    assert syntax_error(source) is None
    assert syntax_error(tmp_path / "gone.py") is None


@pytest.mark.timeout(10)
def test_reload_without_watchfiles_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "watchfiles", None)
    with pytest.raises(
        ConfigurationError, match=re.escape("--reload needs watchfiles: pip install 'nobs_amqp[reload]'")
    ):
        reloading([sys.executable, "-c", "pass"], 1, [Path.cwd()], grace_period=1)
