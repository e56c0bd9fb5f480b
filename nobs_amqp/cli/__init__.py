"""The `nobs-amqp` command line."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, TypeVar

import click

from .. import message as wire
from ..errors import NobsAmqpError, PayloadTypeError, UnknownTaskError
from ..observe import logs
from ..observe.health import ANY_HOST, LOOPBACK_HOST, Health, default_host
from ..observe.observer import DRAINING, READY
from ..project import Project
from . import consume
from .common import APP_ENV, app_reference, load_project, loop_factory, refuse_memory, run_open, worker_of
from .consume import STOP_MARGIN_SECONDS

if TYPE_CHECKING:
    from ..ops.status import ProjectStatus

__all__ = ["APP_ENV", "STOP_MARGIN_SECONDS", "app_reference", "load_project", "main"]

T = TypeVar("T")
log = logging.getLogger("nobs_amqp")


#: Options of the whole command that may also come after a subcommand (there, they win).
_ANYWHERE = ("--app", "--log-level", "--log-format")
#: Command groups in modules of their own, imported when they are used (a worker never loads them).
_ELSEWHERE = {"deploy": "deploy", "dlq": "dlq", "topology": "topology"}


class _Main(click.Group):
    """Accepts `--app`, `--log-level` and `--log-format` after the subcommand too (`nobs-amqp
    status --app x:p`): they are moved in front of it before click parses the line."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except click.UsageError:
            raise
        except click.ClickException as exc:  # with JSON logs, the error is a JSON line too
            if ctx.params.get("log_format") != "json":
                raise
            log.error("%s", exc.format_message())
            ctx.exit(exc.exit_code)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_ELSEWHERE})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in _ELSEWHERE:
            command: click.Command = getattr(importlib.import_module(f".{_ELSEWHERE[cmd_name]}", __package__), cmd_name)
            return command
        return super().get_command(ctx, cmd_name)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        start = 0
        while start < len(args) and args[start] not in self.commands and args[start] not in _ELSEWHERE:
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


@click.group(cls=_Main, epilog="--app, --log-level and --log-format may also come after the command.")
@click.option("--app", "app", metavar="MODULE:ATTR", help="The Project to use (or NOBS_AMQP_APP).")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@click.option(
    "--log-format",
    type=click.Choice(logs.LOG_FORMATS),
    default="text",
    show_default=True,
    help="json: one JSON object a line (time, level, logger, message; task lines add their fields).",
)
@click.version_option(package_name="nobs_amqp")
@click.pass_context
def main(ctx: click.Context, app: str | None, log_level: str, log_format: logs.LogFormat) -> None:
    """Run and operate nobs_amqp workers on RabbitMQ."""
    try:
        handler = logs.handler(log_format, sys.stderr)
    except NobsAmqpError as exc:
        raise click.UsageError(str(exc)) from None
    logging.basicConfig(level=log_level.upper(), handlers=[handler])
    logging.captureWarnings(log_format == "json")
    if log_level != "debug":  # with --log-level debug, everything aio-pika and aiormq say
        logging.getLogger("aio_pika").setLevel(max(logging.WARNING, logging.getLogger().level))
        logging.getLogger("aiormq").setLevel(max(logging.WARNING, logging.getLogger().level))
        # A lost connection: nobs_amqp says it once, and once when it is back. aio-pika and aiormq
        # would log every reconnection attempt, per channel, with errors and tracebacks.
        for library in ("aio_pika.robust_connection", "aio_pika.tools", "aiormq.connection"):
            logging.getLogger(library).setLevel(logging.CRITICAL)
    ctx.obj = app


main.add_command(consume.consume)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object (a line per refresh with --watch).")
@click.option("--watch", is_flag=True, help="Refresh in place every --interval seconds until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(min=0.2), default=2.0, show_default=True)
@click.option("--count", type=click.IntRange(min=1), hidden=True, help="With --watch: stop after this many.")
@click.pass_obj
def status(app: str | None, as_json: bool, watch: bool, interval: float, count: int | None) -> None:
    """Per worker: messages ready, in flight, consumers, dead letters; and retries waiting."""
    from ..ops.status import project_status, task_options

    project = load_project(app_reference(app))
    refuse_memory(project, "status")
    options = task_options(project)

    async def report(project: Project) -> None:
        shown = 0
        while True:
            status = await project_status(project)
            if as_json:
                click.echo(json.dumps({**status.as_dict(project.name), "task_options": options}))
            else:
                if watch:
                    click.clear()
                _echo_status(project, status, options)
            shown += 1
            if not watch or (count is not None and shown >= count):
                return
            await asyncio.sleep(interval)

    with contextlib.suppress(KeyboardInterrupt):
        run_open(project, report)  # opening the project checks the AMQP side answers


def _echo_status(project: Project, report: ProjectStatus, options: dict[str, str]) -> None:
    click.echo(f"connected to {report.node}")
    click.echo(f"{'worker':<32} {'ready':>8} {'in flight':>9} {'consumers':>9} {'dead':>8} {'replicas':>8}  leader")
    for w in report.workers:
        note = "" if w.exists else "  (not declared yet)"
        replicas = f"{w.online}/{w.members}" if w.members else "-"
        row = f"{w.name:<32} {w.ready:>8} {w.in_flight:>9} {w.consumers:>9} {w.dead:>8} {replicas:>8}"
        click.echo(f"{row}  {w.leader or '-'}{note}")
    click.echo(f"waiting in {project.name}.delay.*: {report.delayed} (retries and delayed tasks)")
    for reference, described in options.items():
        click.echo(f"task {reference}: {described} (its own, over its worker's)")


@main.command()
@click.argument("worker")
@click.argument("task")
@click.argument("payload")
@click.option("--delay", type=click.FloatRange(min=0), default=0.0, help="Seconds to hold it back.")
@click.option("--id", "message_id", default=None, help="Its message id (else a random one).")
@click.option("--expires", type=click.FloatRange(min=0, min_open=True), default=None, help="Seconds it may wait.")
@click.pass_obj
def enqueue(
    app: str | None, worker: str, task: str, payload: str, delay: float, message_id: str | None, expires: float | None
) -> None:
    """Queue TASK (module:function, one the project allows) with PAYLOAD (JSON) on WORKER."""
    project = load_project(app_reference(app))
    refuse_memory(project, "enqueue")
    target = worker_of(project, worker)
    try:
        spec = project.tasks().get(task)
    except UnknownTaskError as exc:
        raise click.UsageError(str(exc)) from None
    fn = spec.fn
    try:
        value = spec.decode(payload.encode())
        spec.encode(value)  # as queue() will: "NaN" validates as a float, and JSON cannot carry it
    except (ValueError, PayloadTypeError) as exc:  # bad JSON, a payload that does not validate, or NaN
        raise click.UsageError(f"payload does not fit {task}: {exc}") from None

    click.echo(
        run_open(
            project, lambda _: target.queue(fn, value, delay=delay or None, message_id=message_id, expires=expires)
        )
    )


@main.command()
@click.argument("worker")
@click.argument("message_ids", nargs=-1, required=True)
@click.pass_obj
def cancel(app: str | None, worker: str, message_ids: tuple[str, ...]) -> None:
    """Cancel the tasks with MESSAGE_IDS on WORKER (created with cancellable=True): a worker that
    takes one dead-letters it as `cancelled` instead of running it."""
    project = load_project(app_reference(app))
    refuse_memory(project, "cancel")
    target = worker_of(project, worker)
    if not target.queue_options.cancellable:
        raise click.UsageError(f"worker {worker!r} takes no cancellations: create it with cancellable=True")

    async def cancel_all(_: Project) -> None:
        for message_id in message_ids:
            await target.cancel(message_id)

    run_open(project, cancel_all)
    click.echo(f"cancelled {len(message_ids)} id(s) on {worker}")


@main.command()
@click.option("--list", "listing", is_flag=True, help="Print the schedules and their next ticks, then exit.")
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    help="Serve /livez (the event loop answers) and /readyz (connected) on this port.",
)
@click.option(
    "--metrics-host",
    default=default_host,
    show_default=f"{ANY_HOST} in a Kubernetes pod, else {LOOPBACK_HOST}",
    help="The address --metrics-port listens on.",
)
@click.pass_obj
def schedule(app: str | None, listing: bool, metrics_port: int | None, metrics_host: str) -> None:
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
    refuse_memory(project, "schedule")
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(_schedule(project, metrics_port, metrics_host))
    except NobsAmqpError as exc:
        raise click.ClickException(str(exc)) from None


async def _schedule(project: Project, port: int | None = None, host: str = LOOPBACK_HOST) -> None:
    """The first SIGTERM/SIGINT stops the scheduler, which gives up the lead; a second one exits at once.
    With a `port`, its health is served there: ready once the project is open (active or standing by)."""
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
    from ..scheduler import Scheduler

    health = Health()
    if port is not None:
        project.observers.append(health)
    with health.serve(port=port, host=host) if port is not None else contextlib.nullcontext():
        async with project:
            health.consumer_state("scheduler", READY)
            await Scheduler(project).run(stop)
            health.consumer_state("scheduler", DRAINING)
