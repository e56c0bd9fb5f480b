"""`nobs-amqp consume`: run one worker or several, in this process or in `--processes` children
(or under `--reload`), and what SIGTERM and SIGINT do to it (`SignalPolicy`)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import click

from ..consumer import Consumer
from ..errors import NobsAmqpError
from ..observe.health import ANY_HOST, KUBERNETES_ENV, LOOPBACK_HOST, default_host
from ..project import Project
from ..session import Session
from ..worker import Worker
from .common import APP_ROOTS, app_reference, load_project, loop_factory, worker_of
from .starting import ConsumerGroup, open_when_reachable
from .supervisor import RECYCLE_EXIT, supervise

log = logging.getLogger("nobs_amqp")

#: A signal that finds the event loop blocked this long ends the process at once.
BLOCKED_EXIT_SECONDS = 1.0
#: A signal this soon after the previous one is the same one delivered twice (a `--processes` child
#: gets each Ctrl-C from the terminal and again from its supervisor), not a second Ctrl-C.
REPEATED_SIGNAL_SECONDS = 0.5
#: After the grace period, how long a stop may still take (acks, cancels, closes: each broker round
#: trip is bounded) before the process exits without the broker: whatever it does, a worker is gone
#: within `--grace-period` plus this. Deployments give it more (deploy.SHUTDOWN_MARGIN).
STOP_MARGIN_SECONDS = 5.0


@click.command()
@click.argument("workers", metavar="WORKER...", nargs=-1, required=True)
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
@click.option(
    "--start-timeout",
    type=click.FloatRange(min=0),
    help="Seconds to wait for a broker that cannot be reached at start before exiting 1 "
    "(0: fail at once) [wait until it answers]. A refused login exits at once.",
)
@click.option("--metrics-dir", hidden=True)  # a --processes child: report to the supervisor's folder
@click.pass_context
def consume(ctx: click.Context, /, **options: Any) -> None:
    """Consume the queues of WORKER (one or more, in one process) and run their tasks.

    While the broker cannot be reached at start it waits and tries again (ready: no, live: yes).
    """
    told = Options(**options)
    told.check()
    reference = app_reference(ctx.obj)
    project = load_project(reference)
    targets = [worker_of(project, name) for name in told.workers]
    if told.processes > 1 or told.reload_:
        group = ctx.parent.params  # type: ignore[union-attr]
        sys.exit(_in_processes(told, project, reference, told.command(reference, group, targets)))
    consumer = _in_this_process(told, project, targets)
    log.info("worker %s: stopped after %d task(s)", told.worker, consumer.processed)
    if consumer.recycle_reason is not None:
        sys.exit(RECYCLE_EXIT)


@dataclass(frozen=True, kw_only=True)
class Options:
    """What `nobs-amqp consume` was told: its argument and options, as click parsed them."""

    workers: tuple[str, ...]
    prefetch: int | None
    concurrency: int | None
    burst: bool
    grace_period: float
    processes: int
    max_memory: float | None
    reload_: bool
    recycle_stuck_threads: int | None
    metrics_port: int | None
    metrics_host: str
    max_blocked: float
    start_timeout: float | None
    metrics_dir: str | None

    @property
    def worker(self) -> str:
        """The worker(s), for log lines and health reports."""
        return ", ".join(self.workers)

    def check(self) -> None:
        """A usage error for options that do not go together."""
        twice = sorted({w for w in self.workers if self.workers.count(w) > 1})
        if twice:
            raise click.UsageError(f"worker {', '.join(map(repr, twice))} given more than once: give each worker once")
        if self.burst and self.reload_:
            raise click.UsageError(
                "--burst exits once the queue is empty, --reload restarts the worker: use one of them"
            )
        if self.metrics_port is not None and self.reload_:
            raise click.UsageError("--metrics-port is for deployed workers, --reload for development: use one of them")

    def command(self, reference: str, group: dict[str, Any], targets: list[Worker]) -> list[str]:
        """The command line of a worker process that `--processes` or `--reload` starts: the
        group's options (`group`, the `nobs-amqp` command's) and this command's for one process."""
        options = {
            "--prefetch": self.prefetch,
            "--concurrency": self.concurrency,
            "--grace-period": self.grace_period,
            "--max-memory": self.max_memory,
            # A child whose every slot's thread is stuck past its time limit is replaced.
            "--recycle-stuck-threads": self.concurrency or targets[0].concurrency,
            "--start-timeout": self.start_timeout,
        }
        command = [sys.executable, "-m", "nobs_amqp", "--app", reference, "--log-level", group["log_level"]]
        command += ["--log-format", group["log_format"]]
        command += ["consume", *self.workers, *(f"{k}={v}" for k, v in options.items() if v is not None)]
        command += ["--burst"] if self.burst else []
        return command

    def consumer(self, session: Session, targets: list[Worker]) -> Consumer | ConsumerGroup:
        """The consumer of `targets` on `session` (one worker: its own; several: a group), with these options."""
        if len(targets) == 1:
            return self._one(session, targets[0], self.recycle_stuck_threads)
        # Each worker's every slot stuck: its own concurrency (the option is a flag here).
        stuck = [None if self.recycle_stuck_threads is None else self.concurrency or t.concurrency for t in targets]
        return ConsumerGroup([self._one(session, t, each) for t, each in zip(targets, stuck, strict=True)])

    def _one(self, session: Session, target: Worker, stuck_threads: int | None) -> Consumer:
        return Consumer(
            session,
            target,
            prefetch=self.prefetch,
            concurrency=self.concurrency,
            burst=self.burst,
            grace_period=self.grace_period,
            max_memory_mb=self.max_memory,
            max_stuck_threads=stuck_threads,
        )


# -- in worker processes ------------------------------------------------------------------------


def _in_processes(told: Options, project: Project, reference: str, command: list[str]) -> int:
    """Run `command` in `--processes` worker processes (one that dies is restarted), or under
    `--reload`; the exit code."""
    if told.reload_:
        return _reloading(told, project, reference, command)
    if told.metrics_port is None:
        return supervise(command, told.processes, restart=not told.burst, grace_period=told.grace_period)
    served = {
        "host": told.metrics_host,
        "port": told.metrics_port,
        "worker": told.worker,
        "max_blocked": told.max_blocked,
    }
    return _supervise_served(command, told.processes, restart=not told.burst, grace_period=told.grace_period, **served)


def _reloading(told: Options, project: Project, reference: str, command: list[str]) -> int:
    """`--reload`: run `command` again (it drains first) whenever a .py file of the project changes."""
    try:
        from .reload import reloading, source_roots  # watchfiles, for --reload only

        roots = source_roots(project, reference, APP_ROOTS)
        return reloading(command, told.processes, roots, grace_period=told.grace_period)
    except NobsAmqpError as exc:
        raise click.ClickException(str(exc)) from None


def _supervise_served(command: list[str], processes: int, *, restart: bool, grace_period: float, **served: Any) -> int:
    """`supervise`, with the metrics and health of every worker process served as one (`supervising(**served)`)."""
    try:
        from ..observe.metrics import supervising  # prometheus-client only when metrics are asked for

        with supervising(processes=processes, **served) as (folder, exited):
            command = [*command, f"--metrics-dir={folder}"]
            return supervise(command, processes, restart=restart, grace_period=grace_period, on_exit=exited)
    except NobsAmqpError as exc:
        raise click.ClickException(str(exc)) from None


# -- in this process ----------------------------------------------------------------------------


def _in_this_process(told: Options, project: Project, targets: list[Worker]) -> Consumer | ConsumerGroup:
    """Consume in this process (metrics served or reported when asked) until the consumer stops."""
    try:
        with (
            _metrics(project, told.metrics_host, told.metrics_port, told.metrics_dir, told.max_blocked),
            asyncio.Runner(loop_factory=loop_factory()) as runner,
        ):
            build = functools.partial(told.consumer, targets=targets)
            consumer = runner.run(_consume(project, build, told.start_timeout))
    except NobsAmqpError as exc:
        raise click.ClickException(str(exc)) from None
    return consumer


def _metrics(
    project: Project, host: str, port: int | None, folder: str | None, max_blocked: float
) -> contextlib.AbstractContextManager[object]:
    """Metrics and health served on `port`, or reported into a supervisor's `folder`; else nothing."""
    if port is None and folder is None:
        return contextlib.nullcontext()
    from ..observe.metrics import exporting  # prometheus-client only when metrics are asked for

    return exporting(project.observers, host=host, port=port, directory=folder, max_blocked=max_blocked)


async def _consume(
    project: Project, build: Callable[[Session], Consumer | ConsumerGroup], start_timeout: float | None = None
) -> Consumer | ConsumerGroup:
    """Open `project` (waiting for the broker up to `start_timeout`) and run the consumer `build`
    makes, stopped on SIGTERM/SIGINT as `SignalPolicy` says."""
    policy = SignalPolicy(asyncio.get_running_loop())
    policy.install()
    await open_when_reachable(project, start_timeout)
    async with project:
        consumer = build(project.session)
        policy.consumer = consumer
        await consumer.run()
    return consumer


# -- signals ------------------------------------------------------------------------------------


class SignalPolicy:
    """What SIGTERM and SIGINT do to a consuming process. The first one drains (running tasks get
    the grace period), a second one stops at once (running tasks are cancelled, their messages go
    back to the queue), a third one exits without a word to the broker (which then returns the
    unsettled messages). A signal while it is still connecting (no `consumer` yet) exits at once,
    and so does one that finds the event loop blocked. Whatever the broker does (a stalled
    connection answers nothing), the process exits within the grace period and STOP_MARGIN_SECONDS
    of the first signal, and within STOP_MARGIN_SECONDS of the second."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        #: The consumer the signals stop, once it is built.
        self.consumer: Consumer | ConsumerGroup | None = None
        #: Signals counted so far (a repeated delivery of one counts once), and when the last one came.
        self.signals = 0
        self.last = 0.0

    def install(self) -> None:
        """Handle SIGTERM and SIGINT with `on_signal`."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.on_signal)

    def on_signal(self, signum: int, frame: object) -> None:
        """A plain signal handler (not the loop's): it runs even while a task blocks the loop."""
        name = signal.Signals(signum).name
        if self.consumer is None:  # still connecting: nothing was taken yet, so nothing to drain
            log.info("%s before the worker started: exiting", name)
            _exit_now()
        self._exit_if_blocked(self.consumer, name)
        now = self.loop.time()
        if self.signals and now - self.last < REPEATED_SIGNAL_SECONDS:
            return
        self.signals, self.last = self.signals + 1, now
        if self.signals == 1:
            _exit_by(self.consumer.grace_period + STOP_MARGIN_SECONDS, name)
            self.loop.call_soon_threadsafe(self._stopping, name)
        elif self.signals == 2:
            _exit_by(STOP_MARGIN_SECONDS, f"{name} again")
            self.loop.call_soon_threadsafe(self.consumer.force_stop)
        else:
            log.error("%s a third time: exiting now; the broker returns every unsettled message to the queue", name)
            _exit_now()

    @staticmethod
    def _exit_if_blocked(consumer: Consumer | ConsumerGroup, name: str) -> None:
        """Exit at once when a task has blocked the event loop: the loop could not drain."""
        watchdog = consumer.watchdog
        if watchdog is not None and watchdog.blocked_for() >= BLOCKED_EXIT_SECONDS:
            log.error(
                "%s while the event loop is blocked by %s: it cannot drain, exiting now; "
                "the broker returns every unsettled message to the queue",
                name,
                watchdog.culprit or "a task",
            )
            _exit_now()

    def _stopping(self, name: str) -> None:
        """The first signal, on the loop: the consumer drains."""
        assert self.consumer is not None  # signals before it exists exit at once
        log.info(
            "%s: stopping; running tasks get up to %.0f s to finish (a second SIGINT or SIGTERM, "
            "e.g. Ctrl-C again, stops at once and returns their messages to the queue)",
            name,
            self.consumer.grace_period,
        )
        self.consumer.stop()


def _exit_by(seconds: float, why: str) -> None:
    """Exit `seconds` from now unless the process has exited by then (a daemon timer thread: it
    fires while the event loop waits on a broker that does not answer, or is blocked)."""
    timer = threading.Timer(seconds, _exit_late, (seconds, why))
    timer.daemon = True
    timer.start()


def _exit_late(seconds: float, why: str) -> NoReturn:
    """`_exit_by`'s timer: the stop that `why` began still runs after `seconds`."""
    log.error(
        "%s, still stopping after %.0f s: exiting now; the broker returns every unsettled message to the queue",
        why,
        seconds,
    )
    _exit_now()


def _exit_now() -> NoReturn:
    """End the process at once, log lines written, without a word to the broker."""
    logging.shutdown()
    os._exit(0)
