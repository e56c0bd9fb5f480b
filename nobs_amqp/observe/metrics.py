"""Prometheus metrics of a project's consumers and producers, as an observer.

    metrics = PrometheusMetrics()                      # pip install 'nobs_amqp[metrics]'
    project = Project("shop", [emails], observers=[metrics])
    with metrics.serve(port=9100):                     # /metrics, /livez, /readyz, from a thread
        ...

`nobs-amqp consume W --metrics-port 9100` does the same for a worker process. Under
`--processes N` the children record into prometheus-client's multiprocess files, in a folder
the supervisor makes (and removes at the end), and the supervisor serves them as one with the
children's health (`supervising`).

Labels are bounded: `worker` names come from the project; `task` is the task reference only
for the project's own tasks (`TaskRun.known`), "unknown" for anything else a message names;
`reason`, `outcome` and `kind` are fixed sets. No message id or payload value is ever a label.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import ConfigurationError
from ..message import Message, Reason
from .health import MAX_BLOCKED_SECONDS, Children, Health, serve
from .observer import (
    DRAINING,
    READY,
    RECONNECTING,
    STOPPED,
    Fate,
    Observer,
    Publish,
    TaskRun,
)

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.exposition import choose_encoder
    from prometheus_client.metrics_core import CounterMetricFamily, Metric
    from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ConfigurationError("metrics need prometheus-client: pip install 'nobs_amqp[metrics]'") from exc

#: Where prometheus-client's multiprocess mode keeps each process's values (read when it is imported).
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: The supervisor's folder for its children's metrics and health: `<temp>/nobs-amqp-metrics-<pid>-<random>`.
FOLDER_PREFIX = "nobs-amqp-metrics-"
#: The `task` label of a task the project does not know (whatever the message named).
UNKNOWN = "unknown"
OTHER = "other"
STATES = (READY, RECONNECTING, DRAINING, STOPPED)
OUTCOMES = frozenset(Fate)
REASONS = frozenset(reason.value for reason in Reason)
#: Seconds: background tasks take from milliseconds to an hour.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
CONFIRM_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _Families:
    """The metrics, once per registry (every PrometheusMetrics of a process shares them)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        task, worker = ("worker", "task"), ("worker",)

        def counter(name: str, doc: str, labels: tuple[str, ...]) -> Counter:
            return Counter(f"nobs_amqp_{name}", doc, labels, registry=registry)

        self.started = counter("tasks_started", "Task runs started: the function was called.", task)
        self.succeeded = counter("tasks_succeeded", "Task runs that returned.", task)
        self.failed = counter("tasks_failed", "Task runs that raised (Retry and Reject too) or ran out of time.", task)
        self.retried = counter("tasks_retried", "Deliveries whose retry was placed on the delay ladder.", task)
        self.dead_lettered = counter(
            "tasks_dead_lettered", "Deliveries that went to the worker's DLQ, by reason.", (*task, "reason")
        )
        self.deliveries = counter("deliveries", "Deliveries handled, by how they ended.", (*worker, "outcome"))
        self.duration = Histogram(
            "nobs_amqp_task_duration_seconds",
            "How long task runs took.",
            task,
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "nobs_amqp_tasks_in_flight",
            "Deliveries being handled (a concurrency slot taken).",
            worker,
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.held = Gauge(
            "nobs_amqp_messages_held",
            "Messages delivered to this process and not settled yet (prefetched or in flight).",
            worker,
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.rate_waiting = Gauge(
            "nobs_amqp_rate_limit_waiting",
            "Deliveries waiting for a permit of a rate limit (each holding a concurrency slot).",
            (*worker, "limit"),
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.state = Gauge(
            "nobs_amqp_consumer_state",
            "Consumers in each state (1 or 0 per process).",
            (*worker, "state"),
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.blocked = Gauge(
            "nobs_amqp_event_loop_blocked_seconds",
            "How long the event loop has not answered (about 0 while it runs freely).",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.reconnects = counter("reconnects", "Times the connection to the broker came back after a loss.", ())
        self.publishing_blocked = Gauge(
            "nobs_amqp_publishing_blocked",
            "1 while the broker blocks publishing on this process's connection (a resource alarm), else 0.",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.node = Gauge(
            "nobs_amqp_broker_node",
            "Connections to each broker node (host:port): 1 per process connected to it now, 0 once left.",
            ("node",),
            registry=registry,
            multiprocess_mode="livesum",
        )
        publish = ("worker", "kind")
        self.published = counter("messages_published", "Messages published and confirmed by the broker.", publish)
        self.publish_errors = counter("publish_errors", "Publishes that failed, by error type.", (*publish, "error"))
        self.confirm = Histogram(
            "nobs_amqp_publish_confirm_seconds",
            "From publish to the broker's confirm (waiting for a lost connection included).",
            publish,
            buckets=CONFIRM_BUCKETS,
            registry=registry,
        )


_FAMILIES: weakref.WeakKeyDictionary[CollectorRegistry, _Families] = weakref.WeakKeyDictionary()
_FAMILIES_LOCK = threading.Lock()


def _families(registry: CollectorRegistry) -> _Families:
    with _FAMILIES_LOCK:
        families = _FAMILIES.get(registry)
        if families is None:
            families = _FAMILIES[registry] = _Families(registry)
        return families


class PrometheusMetrics(Observer):
    """Counts what a process's consumers and producers do, in `registry` (by default the process's
    global one, beside its other metrics); with it, the process's `Health`.

    Consumers: task runs started, succeeded, failed, retried and dead-lettered (by reason) per
    task, their duration, deliveries in flight and messages held, deliveries waiting for a rate
    limit's permit (by limit: names the project gave), each consumer's state, event
    loop blocking, reconnects. Producers (any process whose project has it): messages published,
    publish errors and confirm latency, per worker and kind (task, retry, dead letter).
    """

    def __init__(self, *, registry: CollectorRegistry | None = None, max_blocked: float = MAX_BLOCKED_SECONDS) -> None:
        self.registry = registry if registry is not None else REGISTRY
        self.health = Health(max_blocked=max_blocked)
        self._metrics = _families(self.registry)
        self._running: set[int] = set()
        self._nodes: set[str] = set()

    # -- consumers -------------------------------------------------------------------------

    @contextlib.contextmanager
    def handling(self, run: TaskRun) -> Iterator[None]:
        in_flight = self._metrics.in_flight.labels(run.worker)
        in_flight.inc()
        try:
            yield
        finally:
            in_flight.dec()
            self._ended(run, ran=id(run) in self._running)
            self._running.discard(id(run))

    def started(self, run: TaskRun) -> None:
        self._running.add(id(run))
        self._metrics.started.labels(run.worker, _task(run)).inc()

    def _ended(self, run: TaskRun, *, ran: bool) -> None:
        metrics, task = self._metrics, _task(run)
        metrics.deliveries.labels(run.worker, run.outcome if run.outcome in OUTCOMES else OTHER).inc()
        if ran and run.outcome != Fate.REQUEUED:  # a run cancelled at shutdown did not end: its message goes back
            metrics.duration.labels(run.worker, task).observe(run.seconds)
            (metrics.succeeded if run.error is None else metrics.failed).labels(run.worker, task).inc()
        if run.outcome == Fate.RETRIED:
            metrics.retried.labels(run.worker, task).inc()
        elif run.outcome in (Fate.DEAD_LETTERED, Fate.REJECTED):  # a rejected one reaches the DLQ through W.dlx
            reason = run.reason if run.reason in REASONS else OTHER
            metrics.dead_lettered.labels(run.worker, task, reason).inc()

    def holding(self, worker: str, count: int) -> None:
        self._metrics.held.labels(worker).set(count)

    def rate_limited(self, worker: str, limit: str, waiting: int) -> None:
        self._metrics.rate_waiting.labels(worker, limit).set(waiting)

    def consumer_state(self, worker: str, state: str) -> None:
        self.health.consumer_state(worker, state)
        if state == READY:  # shown as 0 from the start, not only after the first message
            self._metrics.in_flight.labels(worker)
            self._metrics.held.labels(worker)
        self._show_states()

    def connection(self, up: bool) -> None:
        self.health.connection(up)
        if up:
            self._metrics.reconnects.inc()
        self._show_states()

    def connection_blocked(self, reason: str | None) -> None:
        self.health.connection_blocked(reason)
        self._metrics.publishing_blocked.set(0 if reason is None else 1)

    def broker_node(self, node: str) -> None:
        for seen in self._nodes - {node}:
            self._metrics.node.labels(seen).set(0)
        self._nodes.add(node)
        self._metrics.node.labels(node).set(1)

    def _show_states(self) -> None:
        for worker, state in self.health.states().items():
            for each in STATES:
                self._metrics.state.labels(worker, each).set(1 if each == state else 0)

    # -- producers -------------------------------------------------------------------------

    @contextlib.contextmanager
    def publishing(self, publish: Publish) -> Iterator[Message]:
        worker, kind = publish.worker, publish.kind.value
        started = time.perf_counter()
        try:
            yield publish.message
        except Exception as exc:
            self._metrics.publish_errors.labels(worker, kind, type(exc).__name__).inc()
            raise
        self._metrics.confirm.labels(worker, kind).observe(time.perf_counter() - started)
        self._metrics.published.labels(worker, kind).inc()

    # -- serving ---------------------------------------------------------------------------

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The registry in the format `accept` (an Accept header) asks for, and its content type."""
        self.refresh()
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type

    def refresh(self) -> None:
        """Bring the values read at scrape time (the event loop's blocking) up to date."""
        self._metrics.blocked.set(self.health.blocked_seconds())

    def serve(self, *, port: int, host: str | None = None) -> contextlib.AbstractContextManager[int]:
        """Serve `/metrics`, `/livez` and `/readyz` on `host:port` from a thread until the block
        ends; yields the port. `host` by default: 0.0.0.0 in a Kubernetes pod, else 127.0.0.1
        (`health.default_host`). MetricsPortError when it cannot listen there."""
        return self.health.serve(port=port, host=host, render=self.render)

    def report_to(self, directory: Path) -> contextlib.AbstractContextManager[None]:
        """As a `--processes` child: refresh the metrics and write the health report into
        `directory` (the supervisor's) every half second, from a thread."""
        return self.health.report_to(directory, tick=self.refresh)


def _task(run: TaskRun) -> str:
    return run.task if run.known else UNKNOWN


# -- nobs-amqp consume --------------------------------------------------------------------------


@contextlib.contextmanager
def exporting(
    observers: list[Observer], *, host: str, port: int | None, directory: str | None, max_blocked: float
) -> Iterator[None]:
    """For `consume`: PrometheusMetrics among `observers` (the project's) while the block runs,
    served on `host:port`, or, in a `--processes` child (`directory` given), reported there. The
    project's own PrometheusMetrics, if it has one, is used (two would count everything twice)."""
    metrics = next((o for o in observers if isinstance(o, PrometheusMetrics)), None)
    added = metrics is None
    if metrics is None:
        metrics = PrometheusMetrics(max_blocked=max_blocked)
        observers.append(metrics)
    metrics.health.max_blocked = max_blocked
    try:
        if directory is not None:
            with metrics.report_to(Path(directory)):
                yield
        else:
            assert port is not None
            with metrics.serve(port=port, host=host):
                yield
    finally:
        if added:
            observers.remove(metrics)


@contextlib.contextmanager
def supervising(
    *, host: str, port: int, worker: str, processes: int, max_blocked: float
) -> Iterator[tuple[str, Callable[[int], None]]]:
    """For `consume --processes N`: a folder for the children's metrics and health reports (set as
    PROMETHEUS_MULTIPROC_DIR for the processes started in the block), served as one on `host:port`.
    Yields the folder and what to call when a child exits and is replaced; removes the folder at the end."""
    remove_orphan_folders(Path(tempfile.gettempdir()))
    directory = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-"))
    children = Children(directory, processes, worker=worker, max_blocked=max_blocked)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    registry.register(_Restarts(children))

    def render(accept: str) -> tuple[bytes, str]:
        encode, content_type = choose_encoder(accept)
        return encode(registry), content_type

    def exited(pid: int) -> None:
        mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call] # its gauges no longer count; its counters do
        children.exited(pid)

    previous = os.environ.get(MULTIPROCESS_ENV)
    os.environ[MULTIPROCESS_ENV] = str(directory)
    try:
        with serve(host, port, children.report, render):
            yield str(directory), exited
    finally:
        if previous is None:
            os.environ.pop(MULTIPROCESS_ENV, None)
        else:
            os.environ[MULTIPROCESS_ENV] = previous
        shutil.rmtree(directory, ignore_errors=True)


def remove_orphan_folders(parent: Path) -> None:
    """Remove the folders of supervisors that died without removing theirs (kill -9)."""
    for folder in parent.glob(f"{FOLDER_PREFIX}*-*"):
        pid = folder.name[len(FOLDER_PREFIX) :].partition("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # alive, someone else's
            continue


class _Restarts:
    """The supervisor's own metric: worker processes it replaced."""

    def __init__(self, children: Children) -> None:
        self._children = children

    def collect(self) -> Iterator[Metric]:
        restarts = CounterMetricFamily(
            "nobs_amqp_process_restarts", "Worker processes that exited and were replaced.", labels=["worker"]
        )
        restarts.add_metric([self._children.worker], self._children.restarts)
        yield restarts
