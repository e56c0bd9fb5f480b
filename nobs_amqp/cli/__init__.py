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
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from .. import message as wire
from ..consumer import Consumer
from ..errors import NobsAmqpError, PayloadTypeError, UnknownTaskError
from ..observe import logs
from ..observe.health import ANY_HOST, KUBERNETES_ENV, LOOPBACK_HOST, default_host
from ..project import Project
from ..session import Session
from .common import APP_ENV, APP_ROOTS, app_reference, load_project, refuse_memory, run_open, worker_of
from .supervisor import RECYCLE_EXIT, supervise

if TYPE_CHECKING:
    from ..ops.status import ProjectStatus

__all__ = ["APP_ENV", "app_reference", "load_project", "main"]

#: A signal that finds the event loop blocked this long ends the process at once.
BLOCKED_EXIT_SECONDS = 1.0

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
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    help="Serve Prometheus /metrics, /livez and /readyz on this port (pip install 'nobs_amqp[metrics]').",
)
@click.option(
    "--metrics-host",
    default=default_host,
    show_default=f"{ANY_HOST} in a Kubernetes pod, else {LOOPBACK_HOST}",
    help=f"The address --metrics-port listens on (a pod: {KUBERNETES_ENV} is set).",
)
@click.option(
    "--max-blocked",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds the event loop may be blocked (by a task) before /livez fails.",
)
@click.option("--metrics-dir", hidden=True)  # a --processes child: report to the supervisor's folder
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
    metrics_port: int | None,
    metrics_host: str,
    max_blocked: float,
    metrics_dir: str | None,
) -> None:
    """Consume WORKER's queue and run its tasks."""
    if burst and reload_:
        raise click.UsageError("--burst exits once the queue is empty, --reload restarts the worker: use one of them")
    if metrics_port is not None and reload_:
        raise click.UsageError("--metrics-port is for deployed workers, --reload for development: use one of them")
    reference = app_reference(ctx.obj)
    project = load_project(reference)
    target = worker_of(project, worker)
    if processes > 1 or reload_:
        options = {
            "--prefetch": prefetch,
            "--concurrency": concurrency,
            "--grace-period": grace_period,
            "--max-memory": max_memory,
            # A child whose every slot's thread is stuck past its time limit is replaced.
            "--recycle-stuck-threads": concurrency or target.concurrency,
        }
        group = ctx.parent.params  # type: ignore[union-attr]
        command = [sys.executable, "-m", "nobs_amqp", "--app", reference, "--log-level", group["log_level"]]
        command += ["--log-format", group["log_format"]]
        command += ["consume", worker, *(f"{k}={v}" for k, v in options.items() if v is not None)]
        command += ["--burst"] if burst else []
        if reload_:
            try:
                from .reload import reloading, source_roots  # watchfiles, for --reload only

                roots = source_roots(project, reference, APP_ROOTS)
                sys.exit(reloading(command, processes, roots, grace_period=grace_period))
            except NobsAmqpError as exc:
                raise click.ClickException(str(exc)) from None
        if metrics_port is None:
            sys.exit(supervise(command, processes, restart=not burst, grace_period=grace_period))
        served = {"host": metrics_host, "port": metrics_port, "worker": worker, "max_blocked": max_blocked}
        sys.exit(_supervise_served(command, processes, restart=not burst, grace_period=grace_period, **served))

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
        with (
            _metrics(project, metrics_host, metrics_port, metrics_dir, max_blocked),
            asyncio.Runner(loop_factory=_loop_factory()) as runner,
        ):
            consumer = runner.run(_consume(project, build))
    except NobsAmqpError as exc:
        raise click.ClickException(str(exc)) from None
    log.info("worker %s: stopped after %d task(s)", worker, consumer.processed)
    if consumer.recycle_reason is not None:
        sys.exit(RECYCLE_EXIT)


def _supervise_served(command: list[str], processes: int, *, restart: bool, grace_period: float, **served: Any) -> int:
    """`supervise`, with the metrics and health of every worker process served as one (`supervising(**served)`)."""
    try:
        from ..observe.metrics import supervising  # prometheus-client only when metrics are asked for

        with supervising(processes=processes, **served) as (folder, exited):
            command = [*command, f"--metrics-dir={folder}"]
            return supervise(command, processes, restart=restart, grace_period=grace_period, on_exit=exited)
    except NobsAmqpError as exc:
        raise click.ClickException(str(exc)) from None


def _metrics(
    project: Project, host: str, port: int | None, folder: str | None, max_blocked: float
) -> contextlib.AbstractContextManager[object]:
    """Metrics and health served on `port`, or reported into a supervisor's `folder`; else nothing."""
    if port is None and folder is None:
        return contextlib.nullcontext()
    from ..observe.metrics import exporting  # prometheus-client only when metrics are asked for

    return exporting(project.observers, host=host, port=port, directory=folder, max_blocked=max_blocked)


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
@click.pass_obj
def enqueue(app: str | None, worker: str, task: str, payload: str, delay: float) -> None:
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

    click.echo(run_open(project, lambda _: target.queue(fn, value, delay=delay or None)))


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
    refuse_memory(project, "schedule")
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
    from ..scheduler import Scheduler

    async with project:
        await Scheduler(project).run(stop)


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
#: After the grace period, how long a stop may still take (acks, cancels, closes: each broker round
#: trip is bounded) before the process exits without the broker: whatever it does, a worker is gone
#: within `--grace-period` plus this. Deployments give it more (deploy.SHUTDOWN_MARGIN).
STOP_MARGIN_SECONDS = 5.0


def _exit_by(seconds: float, why: str) -> None:
    """Exit `seconds` from now unless the process has exited by then (a daemon timer thread: it
    fires while the event loop waits on a broker that does not answer, or is blocked)."""

    def exit_now() -> None:
        log.error(
            "%s, still stopping after %.0f s: exiting now; the broker returns every unsettled message to the queue",
            why,
            seconds,
        )
        logging.shutdown()
        os._exit(0)

    timer = threading.Timer(seconds, exit_now)
    timer.daemon = True
    timer.start()


async def _consume(project: Project, build: Callable[[Session], Consumer]) -> Consumer:
    """Open `project` and run the consumer `build` makes. The first SIGTERM/SIGINT drains (running
    tasks get the grace period), a second one stops at once (running tasks are cancelled, their
    messages go back to the queue), a third one exits without a word to the broker (which then
    returns the unsettled messages). A signal while it is still connecting exits at once. Whatever
    the broker does (a stalled connection answers nothing), the process exits within the grace
    period and STOP_MARGIN_SECONDS of the first signal, and within STOP_MARGIN_SECONDS of the second."""
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
            _exit_by(consumer.grace_period + STOP_MARGIN_SECONDS, name)
            loop.call_soon_threadsafe(stopping, name)
        elif signals == 2:
            _exit_by(STOP_MARGIN_SECONDS, f"{name} again")
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
