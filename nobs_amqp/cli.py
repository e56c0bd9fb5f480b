"""The `nobs-amqp` command line."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import re
import signal
import sys
import tomllib
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TypeVar

import click

from . import dlq as dead
from . import message as wire
from .consumer import Consumer
from .errors import NobsAmqpError, UnknownTaskError
from .message import Message, printable
from .project import Project
from .reload import reloading, source_roots
from .scheduler import Scheduler
from .session import Session
from .status import delete, deletion, project_status, task_options, topology_diff, topology_json, topology_table
from .supervisor import RECYCLE_EXIT, supervise
from .topology import Topology, definitions
from .urls import in_process
from .worker import Worker

APP_ENV = "NOBS_AMQP_APP"
#: A signal that finds the event loop blocked this long ends the process at once.
BLOCKED_EXIT_SECONDS = 1.0

T = TypeVar("T")
log = logging.getLogger("nobs_amqp")


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


_ROOTS: list[str] = []  # folders of the pyproject.toml files that named the app, first on sys.path


def _import_first_from(folder: Path) -> None:
    root = str(folder)
    if root in sys.path:
        sys.path.remove(root)
    sys.path.insert(0, root)
    _ROOTS.append(root)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    os.environ["PYTHONPATH"] = os.pathsep.join([root, *(p for p in paths if p and p != root)])


def load_project(reference: str) -> Project:
    module_name, _, attr = reference.partition(":")
    if not module_name or not attr:
        raise click.UsageError(f"app {reference!r} must look like module:attr (e.g. myapp.worker:project)")
    if os.getcwd() not in sys.path:  # after the folder of the pyproject.toml that named the app
        sys.path.insert(sum(1 for p in sys.path[: len(_ROOTS)] if p in _ROOTS), os.getcwd())
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


#: Options of the whole command that may also come after a subcommand (there, they win).
_ANYWHERE = ("--app", "--log-level")


class _Main(click.Group):
    """Accepts `--app` and `--log-level` after the subcommand too (`nobs-amqp status --app x:p`):
    they are moved in front of it before click parses the line."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        start = 0
        while start < len(args) and args[start] not in self.commands:
            start += 2 if args[start] in _ANYWHERE else 1
        front, moved, rest = args[:start], [], []
        tail = args[start:]
        i = 0
        while i < len(tail):
            arg = tail[i]
            if arg == "--":
                rest += tail[i:]
                break
            if arg in _ANYWHERE:
                if i + 1 == len(tail):
                    raise click.UsageError(f"option '{arg}' requires an argument", ctx)
                moved += tail[i : i + 2]
                i += 2
                continue
            (moved if arg.startswith(tuple(f"{o}=" for o in _ANYWHERE)) else rest).append(arg)
            i += 1
        return super().parse_args(ctx, [*front, *moved, *rest])


@click.group(cls=_Main, epilog="--app and --log-level may also come after the command.")
@click.option("--app", "app", metavar="MODULE:ATTR", help="The Project to use (or NOBS_AMQP_APP).")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@click.version_option(package_name="nobs_amqp")
@click.pass_context
def main(ctx: click.Context, app: str | None, log_level: str) -> None:
    """Run and operate nobs_amqp workers on RabbitMQ."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr
    )
    if log_level != "debug":  # with --log-level debug, everything aio-pika and aiormq say
        logging.getLogger("aio_pika").setLevel(max(logging.WARNING, logging.getLogger().level))
        logging.getLogger("aiormq").setLevel(max(logging.WARNING, logging.getLogger().level))
        # A lost connection: nobs_amqp says it once, and once when it is back. aio-pika and aiormq
        # would log every reconnection attempt, per channel, with errors and tracebacks.
        for library in ("aio_pika.robust_connection", "aio_pika.tools", "aiormq.connection"):
            logging.getLogger(library).setLevel(logging.CRITICAL)
    ctx.obj = app


@main.command()
@click.argument("worker")
@click.option("--prefetch", type=click.IntRange(min=1), help="Unacked messages held at once [worker's].")
@click.option("--concurrency", type=click.IntRange(min=1), help="Tasks run at once [worker's].")
@click.option("--burst", is_flag=True, help="Process what is in the queue, then exit 0 once it is empty.")
@click.option(
    "--grace-period",
    type=click.FloatRange(min=0),
    default=25.0,
    show_default=True,
    help="Seconds running tasks get to finish after SIGTERM/SIGINT.",
)
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes (for CPU-bound sync tasks); one that dies is restarted.",
)
@click.option(
    "--max-memory",
    type=click.FloatRange(min=1),
    help="MiB: a process that grows past this after a task finishes its running tasks and exits "
    f"(code {RECYCLE_EXIT}) to be replaced; with --processes, the supervisor restarts it.",
)
@click.option("--reload", "reload_", is_flag=True, help="Restart the worker (it drains first) when a .py file changes.")
@click.option("--recycle-stuck-threads", type=click.IntRange(min=1), hidden=True)
@click.pass_context
def consume(
    ctx: click.Context,
    worker: str,
    prefetch: int | None,
    concurrency: int | None,
    burst: bool,
    grace_period: float,
    processes: int,
    max_memory: float | None,
    reload_: bool,
    recycle_stuck_threads: int | None,
) -> None:
    """Consume WORKER's queue and run its tasks."""
    if burst and reload_:
        raise click.UsageError("--burst exits once the queue is empty, --reload restarts the worker: use one of them")
    reference = app_reference(ctx.obj)
    project = load_project(reference)
    target = _worker(project, worker)
    if processes > 1 or reload_:
        options = {
            "--prefetch": prefetch,
            "--concurrency": concurrency,
            "--grace-period": grace_period,
            "--max-memory": max_memory,
            # A child whose every slot's thread is stuck past its time limit is replaced.
            "--recycle-stuck-threads": concurrency or target.concurrency,
        }
        command = [sys.executable, "-m", "nobs_amqp", "--app", reference, "--log-level", ctx.parent.params["log_level"]]  # type: ignore[union-attr]
        command += ["consume", worker, *(f"{k}={v}" for k, v in options.items() if v is not None)]
        command += ["--burst"] if burst else []
        if reload_:
            try:
                roots = source_roots(project, reference, _ROOTS)
                sys.exit(reloading(command, processes, roots, grace_period=grace_period))
            except NobsAmqpError as exc:
                raise click.ClickException(str(exc)) from None
        sys.exit(supervise(command, processes, restart=not burst, grace_period=grace_period))

    def build(session: Session) -> Consumer:
        return Consumer(
            session,
            target,
            prefetch=prefetch,
            concurrency=concurrency,
            burst=burst,
            grace_period=grace_period,
            max_memory_mb=max_memory,
            max_stuck_threads=recycle_stuck_threads,
        )

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            consumer = runner.run(_consume(project, build))
    except NobsAmqpError as exc:
        raise click.ClickException(str(exc)) from None
    log.info("worker %s: stopped after %d task(s)", worker, consumer.processed)
    if consumer.recycle_reason is not None:
        sys.exit(RECYCLE_EXIT)


def _worker(project: Project, name: str) -> Worker:
    try:
        return project.worker(name)
    except NobsAmqpError as exc:
        raise click.UsageError(str(exc)) from None


def _run(project: Project, action: Callable[[Project], Awaitable[T]]) -> T:
    """Run `action` with the project open; a nobs_amqp error becomes a clean CLI error."""

    async def run() -> T:
        async with project:
            return await action(project)

    try:
        return asyncio.run(run())
    except NobsAmqpError as exc:
        raise click.ClickException(str(exc)) from None


def _refuse_memory(project: Project, what: str) -> None:
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


@main.group()
def dlq() -> None:
    """Read, replay and purge a worker's dead-letter queue (WORKER.dlq)."""


def _dlq_run(app: str | None, worker: str, action: Callable[[Session, Worker], Awaitable[T]]) -> T:
    project = load_project(app_reference(app))
    _refuse_memory(project, "dlq")
    target = _worker(project, worker)
    return _run(project, lambda p: action(p.session, target))


#: Characters of a dead letter's error `dlq list` shows (its first line); `dlq show` gives it all.
ERROR_WIDTH = 100


def _summary(message: Message) -> str:
    """One line per dead letter. A message the broker dead-lettered itself (it carries `x-death`;
    the worker's own dead letters never do) gets the broker's reason: its `x-nobs-*` values are
    whatever its publisher wrote. Of the error, the first line (a pydantic validation error has
    one per field), cut at ERROR_WIDTH."""
    headers = message.headers
    broker_reason = _death_reason(headers)
    moment = dead.dead_at(message)
    when = wire.format_time(moment) if moment is not None else "?"
    reason, error = (
        (f"{broker_reason} (by the broker)", "")
        if broker_reason is not None
        else (str(headers.get(wire.REASON) or "?"), _first_line(headers.get(wire.ERROR_MESSAGE, "")))
    )
    line = f"{message.message_id}  {when}  {reason:<16}  attempt {message.attempt}  {message.task}  {error}"
    return printable(line, 2000)


def _first_line(value: object) -> str:
    lines = str(value).splitlines() or [""]
    first = lines[0].rstrip()
    if len(first) > ERROR_WIDTH or len(lines) > 1:
        return f"{first[:ERROR_WIDTH].rstrip()} ... (see dlq show)"
    return first


_TERMINAL_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # all but tab and newline
#: The quorum queue's delivery count: on a DLQ, how often the message was read and given back.
PEEK_COUNT = "x-delivery-count"


def _death_reason(headers: Mapping[str, object]) -> str | None:
    """The broker's reason (`x-death`) for a message it dead-lettered itself."""
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return str(deaths[0].get("reason"))
    return None


@dlq.command("list")
@click.argument("worker")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.pass_obj
def dlq_list(app: str | None, worker: str, limit: int) -> None:
    """List WORKER's dead letters, oldest first: id, dead-lettered at, reason, attempt, task, error.

    Oldest by when they were dead-lettered, not by their place in the queue (reading a quorum
    queue moves what was read to its back); --limit N shows the N oldest, so it reads them all."""
    messages = _dlq_run(app, worker, lambda p, w: dead.peek(p, w, limit))
    for message in messages:
        click.echo(_summary(message))
    click.echo(f"{len(messages)} dead letter(s) shown, oldest first", err=True)


@dlq.command("show")
@click.argument("worker")
@click.argument("message_id")
@click.pass_obj
def dlq_show(app: str | None, worker: str, message_id: str) -> None:
    """Everything about one dead letter: properties, headers (traceback included) and body.

    Reads WORKER.dlq from its head until it finds the message, however long the queue."""
    message = _dlq_run(app, worker, lambda p, w: dead.find(p, w, message_id))
    if message is None:
        raise click.ClickException(
            f"no dead letter {printable(message_id)} in {worker}.dlq (see `nobs-amqp dlq list {worker}`)"
        )
    moment = dead.dead_at(message)
    lines = [f"message id: {message.message_id}", f"task: {message.task}", f"app: {message.app_id}"]
    lines.append(f"dead-lettered at: {wire.format_time(moment) if moment is not None else '?'}")
    # On a quorum DLQ the broker counts every read that gave the message back (dlq list, dlq
    # show, the management UI's "Get messages") in x-delivery-count: peeks, not runs of the task.
    peeks = message.headers.get(PEEK_COUNT)
    if isinstance(peeks, int) and not isinstance(peeks, bool) and peeks > 0:
        lines.append(f"peeked: {peeks} time(s) before (reads of {worker}.dlq; the task did not run)")
    lines += [f"{key}: {value}" for key, value in sorted(message.headers.items()) if key != PEEK_COUNT]
    lines.append(f"body: {message.body.decode(errors='replace')}")
    for line in lines:  # what a publisher wrote must not drive the operator's terminal
        click.echo(_TERMINAL_CONTROLS.sub(lambda m: m.group().encode("unicode_escape").decode(), line))


@dlq.command("replay")
@click.argument("worker")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many [all].")
@click.pass_obj
def dlq_replay(app: str | None, worker: str, limit: int | None) -> None:
    """Move WORKER's dead letters back to its queue, attempt count reset, each acked once its copy is confirmed.

    Replays what is in the DLQ when the command starts (with --limit N, the N oldest by when
    they were dead-lettered), each message once; what fails again or arrives meanwhile stays there."""
    waiting = _dlq_run(app, worker, dead.count)
    total = min(waiting, limit) if limit is not None else waiting
    with click.progressbar(length=total, label=f"replaying {worker}.dlq", show_pos=True, file=sys.stderr) as bar:
        moved = _dlq_run(app, worker, lambda p, w: dead.replay(p, w, total, bar.update)) if total else 0
    click.echo(f"replayed {moved} message(s) to {worker}")
    if moved < total:
        click.echo(
            f"{total - moved} of the {total} dead letter(s) there at the start were not replayed: "
            f"another consumer of {worker}.dlq holds them; run the command again once it is done",
            err=True,
        )


@dlq.command("purge")
@click.argument("worker")
@click.option("--yes", is_flag=True, help="Do not ask first.")
@click.pass_obj
def dlq_purge(app: str | None, worker: str, yes: bool) -> None:
    """Delete every dead letter of WORKER (asks first, saying how many)."""
    waiting = _dlq_run(app, worker, dead.count)
    if waiting == 0:
        click.echo(f"nothing to purge: {worker}.dlq is empty")
        return
    if not yes:
        click.confirm(f"Delete all {waiting} dead letters of {worker} ({worker}.dlq) for good?", abort=True)
    count = _dlq_run(app, worker, dead.purge)
    click.echo(f"purged {count} message(s) from {worker}.dlq")


@main.command()
@click.pass_obj
def status(app: str | None) -> None:
    """Per worker: messages ready, in flight, consumers, dead letters; and retries waiting."""
    project = load_project(app_reference(app))
    _refuse_memory(project, "status")
    report = _run(project, project_status)  # opening the project checks the AMQP side answers
    click.echo(f"{'worker':<32} {'ready':>8} {'in flight':>9} {'consumers':>9} {'dead':>8}")
    for w in report.workers:
        note = "" if w.exists else "  (not declared yet)"
        click.echo(f"{w.name:<32} {w.ready:>8} {w.in_flight:>9} {w.consumers:>9} {w.dead:>8}{note}")
    click.echo(f"waiting in {project.name}.delay.*: {report.delayed} (retries and delayed tasks)")
    _echo_task_options(project)


def _echo_task_options(project: Project) -> None:
    for reference, options in task_options(project).items():
        click.echo(f"task {reference}: {options} (its own, over its worker's)")


@main.command()
@click.argument("worker")
@click.argument("task")
@click.argument("payload")
@click.option("--delay", type=click.FloatRange(min=0), default=0.0, help="Seconds to hold it back.")
@click.pass_obj
def enqueue(app: str | None, worker: str, task: str, payload: str, delay: float) -> None:
    """Queue TASK (module:function, one the project allows) with PAYLOAD (JSON) on WORKER."""
    project = load_project(app_reference(app))
    _refuse_memory(project, "enqueue")
    target = _worker(project, worker)
    try:
        spec = project.tasks().get(task)
    except UnknownTaskError as exc:
        raise click.UsageError(str(exc)) from None
    fn = spec.fn
    try:
        value = spec.decode(payload.encode())
    except ValueError as exc:  # bad JSON, or a payload that does not validate
        raise click.UsageError(f"payload does not fit {task}: {exc}") from None

    click.echo(_run(project, lambda _: target.queue(fn, value, delay=delay or None)))


@main.command()
@click.option("--list", "listing", is_flag=True, help="Print the schedules and their next ticks, then exit.")
@click.pass_obj
def schedule(app: str | None, listing: bool) -> None:
    """Enqueue the project's schedules until SIGTERM/SIGINT. Run it in as many processes as you
    like: one is active, the others stand by and take over within seconds if it stops or dies."""
    project = load_project(app_reference(app))
    if not project.schedules:
        raise click.UsageError(f"project {project.name!r} has no schedules: add them with Project(schedules=[...])")
    if listing:
        now = wire.wall_clock()
        click.echo(f"{'schedule':<32} {'when':<36} {'next tick':<24} task on worker")
        for each in project.schedules.values():
            upcoming = wire.format_time(each.next_tick(now))
            click.echo(f"{each.name:<32} {each.describe():<36} {upcoming:<24} {each.reference} on {each.worker.name}")
        return
    _refuse_memory(project, "schedule")
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_schedule(project))
    except NobsAmqpError as exc:
        raise click.ClickException(str(exc)) from None


async def _schedule(project: Project) -> None:
    """The first SIGTERM/SIGINT stops the scheduler, which gives up the lead; a second one exits at once."""
    stop = asyncio.Event()

    def on_signal(name: str) -> None:
        if stop.is_set():
            log.info("%s again: exiting now", name)
            logging.shutdown()
            os._exit(0)
        log.info("%s: stopping", name)
        stop.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum.name)
    async with project:
        await Scheduler(project).run(stop)


@main.group()
def topology() -> None:
    """The queues, exchanges and bindings the project declares."""


def _with_project(app: str | None, action: Callable[[Project], Awaitable[T]], *, refuse_memory: str = "") -> T:
    """Run `action` with the project open; `refuse_memory` names a command that makes no sense on memory://."""
    project = load_project(app_reference(app))
    if refuse_memory:
        _refuse_memory(project, refuse_memory)
    return _run(project, action)


@topology.command("show")
@click.option("--json", "as_json", is_flag=True, help="The same as JSON.")
@click.pass_obj
def topology_show(app: str | None, as_json: bool) -> None:
    """List every exchange, queue (arguments as key=value) and binding (source -> destination [key])."""

    async def show(project: Project) -> Topology:
        return project.topology()

    wanted = _with_project(app, show)
    if as_json:
        click.echo(json.dumps(topology_json(wanted), indent=2))
        return
    for line in topology_table(wanted):
        click.echo(line)


@topology.command("apply")
@click.pass_obj
def topology_apply(app: str | None) -> None:
    """Declare everything now (idempotent; a mismatch is reported, never changed)."""

    async def apply(project: Project) -> int:
        for worker in project.workers.values():
            await project.session.declare(worker, delayed=True)
        return len(project.workers)

    count = _with_project(app, apply, refuse_memory="topology apply")
    click.echo(f"declared the topology of {count} worker(s) and the delay ladder")


@topology.command("diff")
@click.pass_obj
def topology_diff_command(app: str | None) -> None:
    """What the broker lacks (queues, exchanges, bindings) or has with other arguments (exit 1 if anything)."""
    lines = _with_project(app, topology_diff, refuse_memory="topology diff")
    for line in lines:
        click.echo(line)
    if any(line.startswith("missing ") for line in lines):
        click.echo("declare what is missing with `nobs-amqp topology apply` (a worker also does when it starts)")
    if any(not line.startswith("missing ") for line in lines):
        click.echo(
            "an object with other arguments is never changed for you: `nobs-amqp topology apply` "
            "names it and says how to migrate it"
        )
    if lines:
        sys.exit(1)
    click.echo("the broker has everything, with the same arguments")


@topology.command("export")
@click.pass_obj
def topology_export(app: str | None) -> None:
    """Print RabbitMQ definitions JSON (import it in the management UI)."""

    async def export(project: Project) -> dict[str, list[dict[str, object]]]:
        return definitions(project.topology(), project.session.transport.vhost)

    click.echo(json.dumps(_with_project(app, export, refuse_memory="topology export"), indent=2))


@topology.command("delete")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def topology_delete(app: str | None, yes: bool) -> None:
    """Delete the project's queues (their messages too) and exchanges: every worker's and the delay ladder."""
    found = _with_project(app, deletion, refuse_memory="topology delete")
    if not found.queues and not found.exchanges:
        click.echo(f"nothing to delete: no queue or exchange of the project in vhost {found.vhost!r}")
        return
    if not yes:
        click.echo(f"in vhost {found.vhost!r} this deletes, with every message they hold:")
        for queue in found.queues:
            busy = f", {queue.consumers} consumer(s)" if queue.consumers else ""
            click.echo(f"  queue    {queue.name} ({queue.messages} message(s){busy})")
        for exchange in found.exchanges:
            click.echo(f"  exchange {exchange}")
        if found.consumers:
            click.echo(f"{found.consumers} consumer(s) are attached: stop the workers first, or they declare it again")
        click.confirm(
            f"delete {len(found.queues)} queue(s) holding {found.messages} message(s) "
            f"and {len(found.exchanges)} exchange(s)?",
            abort=True,
        )
    _with_project(app, lambda project: delete(project, found))
    click.echo(
        f"deleted {len(found.queues)} queue(s) ({found.messages} message(s)) "
        f"and {len(found.exchanges)} exchange(s) from vhost {found.vhost!r}"
    )


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (`pip install nobs_amqp[uvloop]`), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


#: A signal this soon after the previous one is the same one delivered twice (a `--processes` child
#: gets each Ctrl-C from the terminal and again from its supervisor), not a second Ctrl-C.
REPEATED_SIGNAL_SECONDS = 0.5


async def _consume(project: Project, build: Callable[[Session], Consumer]) -> Consumer:
    """Open `project` and run the consumer `build` makes. The first SIGTERM/SIGINT drains (running
    tasks get the grace period), a second one stops at once (running tasks are cancelled, their
    messages go back to the queue), a third one exits without a word to the broker (which then
    returns the unsettled messages). A signal while it is still connecting exits at once."""
    loop = asyncio.get_running_loop()
    signals = 0
    last = 0.0
    consumer: Consumer | None = None

    def on_signal(signum: int, frame: object) -> None:
        nonlocal signals, last
        # A plain signal handler (not the loop's): it runs even while a task blocks the loop.
        name = signal.Signals(signum).name
        if consumer is None:  # still connecting: nothing was taken yet, so nothing to drain
            log.info("%s before the worker started: exiting", name)
            logging.shutdown()
            os._exit(0)
        watchdog = consumer.watchdog
        if watchdog is not None and watchdog.blocked_for() >= BLOCKED_EXIT_SECONDS:
            log.error(
                "%s while the event loop is blocked by %s: it cannot drain, exiting now; "
                "the broker returns every unsettled message to the queue",
                name,
                watchdog.culprit or "a task",
            )
            logging.shutdown()
            os._exit(0)
        now = loop.time()
        if signals and now - last < REPEATED_SIGNAL_SECONDS:
            return
        signals, last = signals + 1, now
        if signals == 1:
            loop.call_soon_threadsafe(stopping, name)
        elif signals == 2:
            loop.call_soon_threadsafe(consumer.force_stop)
        else:
            log.error("%s a third time: exiting now; the broker returns every unsettled message to the queue", name)
            logging.shutdown()
            os._exit(0)

    def stopping(name: str) -> None:
        assert consumer is not None  # signals before it exists exit at once
        log.info(
            "%s: stopping; running tasks get up to %.0f s to finish (a second SIGINT or SIGTERM, "
            "e.g. Ctrl-C again, stops at once and returns their messages to the queue)",
            name,
            consumer.grace_period,
        )
        consumer.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    async with project:
        consumer = build(project.session)
        await consumer.run()
    return consumer
