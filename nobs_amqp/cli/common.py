"""What every `nobs-amqp` command needs: finding the project, and running it open."""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import click

from ..errors import NobsAmqpError
from ..project import Project
from ..urls import in_process
from ..worker import Worker

APP_ENV = "NOBS_AMQP_APP"

T = TypeVar("T")


def app_reference(option: str | None) -> str:
    """`module:attr` of the project: --app, else NOBS_AMQP_APP, else [tool.nobs-amqp] in pyproject.toml.

    An app named in a pyproject.toml is imported from the folder of that file (put first on
    sys.path, and on PYTHONPATH for the worker processes `--processes` starts), so the
    commands work from any subdirectory of the project."""
    if option:
        return option
    if os.environ.get(APP_ENV):
        return os.environ[APP_ENV]
    for folder in (Path.cwd(), *Path.cwd().parents):
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file():
            import tomllib  # only when the app is named there

            with pyproject.open("rb") as f:
                app = tomllib.load(f).get("tool", {}).get("nobs-amqp", {}).get("app")
            if isinstance(app, str):
                _import_first_from(folder)
                return app
            break
    raise click.UsageError(
        "no project given: pass --app module:attr, set NOBS_AMQP_APP, "
        'or add [tool.nobs-amqp] app = "module:attr" to pyproject.toml'
    )


APP_ROOTS: list[str] = []  # folders of the pyproject.toml files that named the app, first on sys.path


def _import_first_from(folder: Path) -> None:
    root = str(folder)
    if root in sys.path:
        sys.path.remove(root)
    sys.path.insert(0, root)
    APP_ROOTS.append(root)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    os.environ["PYTHONPATH"] = os.pathsep.join([root, *(p for p in paths if p and p != root)])


def load_project(reference: str) -> Project:
    module_name, _, attr = reference.partition(":")
    if not module_name or not attr:
        raise click.UsageError(f"app {reference!r} must look like module:attr (e.g. myapp.worker:project)")
    if os.getcwd() not in sys.path:  # after the folder of the pyproject.toml that named the app
        sys.path.insert(sum(1 for p in sys.path[: len(APP_ROOTS)] if p in APP_ROOTS), os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.UsageError(f"cannot import {module_name!r} for --app {reference}: {exc}") from exc
    except NobsAmqpError as exc:  # e.g. Project(url=...) with a malformed URL: no traceback, no source line
        raise click.UsageError(f"{module_name} cannot be loaded for --app {reference}: {exc}") from None
    project = getattr(module, attr, None)
    if not isinstance(project, Project):
        found = type(project).__name__ if project is not None else "nothing"
        raise click.UsageError(f"{reference} is {found}, not a nobs_amqp Project")
    return project


def worker_of(project: Project, name: str) -> Worker:
    try:
        return project.worker(name)
    except NobsAmqpError as exc:
        raise click.UsageError(str(exc)) from None


def run_open(project: Project, action: Callable[[Project], Awaitable[T]]) -> T:
    """Run `action` with the project open; a nobs_amqp error becomes a clean CLI error."""

    async def run() -> T:
        async with project:
            return await action(project)

    try:
        return asyncio.run(run())
    except NobsAmqpError as exc:
        raise click.ClickException(str(exc)) from None


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (`pip install nobs_amqp[uvloop]`), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def refuse_memory(project: Project, what: str) -> None:
    """A usage error for `what` (e.g. "status") when the project's broker is memory://: it lives
    inside one process, so a command run on its own would read or change an empty broker that
    is gone when the command exits."""
    try:
        url = project.urls[0]
    except NobsAmqpError as exc:  # a malformed NOBS_AMQP_URL: no traceback
        raise click.ClickException(str(exc)) from None
    if in_process(url):
        raise click.UsageError(
            f"{what} needs RabbitMQ: NOBS_AMQP_URL is memory://, a broker that lives inside one "
            f"process and is gone when this command exits; set NOBS_AMQP_URL to an amqp:// URL"
        )


def with_project(app: str | None, action: Callable[[Project], Awaitable[T]], *, refuse: str = "") -> T:
    """Run `action` with the project open; `refuse` names a command that makes no sense on memory://."""
    project = load_project(app_reference(app))
    if refuse:
        refuse_memory(project, refuse)
    return run_open(project, action)
