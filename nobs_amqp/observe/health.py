"""Health of a consuming process, served over HTTP beside its metrics: `/livez`, `/readyz`, `/metrics`.

Live: the event loop answers. A task that blocks it (a `time.sleep` inside `async def`) makes
the process not live once the loop has not answered for `max_blocked` seconds. Ready: every
consumer of the process is subscribed (READY) and the connection is up; not while it reconnects
(a stalled connection is found and dropped within the heartbeat, then reconnects), drains after
SIGTERM or has stopped. A connection on which the broker blocks publishing (a resource alarm)
is up and says `"connection": "blocked"` with the broker's reason: the worker still consumes.
The endpoint runs in a thread of its own, so it answers while the loop is blocked; each answer
is a JSON report (state, workers, connection, blocked seconds).

Under `consume --processes N` each worker process writes its report into a folder the
supervisor made (`Health.report_to`), and the supervisor serves them as one (`Children`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from ..errors import ConfigurationError, MetricsPortError
from . import httpserve
from .observer import DRAINING, READY, RECONNECTING, STOPPED, Observer
from .watchdog import LoopWatchdog

log = logging.getLogger("nobs_amqp")

#: Seconds the event loop may go unanswered before `/livez` fails.
MAX_BLOCKED_SECONDS = 10.0
#: Before any consumer of the process is ready.
STARTING = "starting"
#: A worker process whose report stopped coming (it is frozen, or hung outside Python).
UNRESPONSIVE = "unresponsive"
#: How each process's state weighs in the state of the whole: the worst one wins.
_RANK = {READY: 0, STARTING: 1, RECONNECTING: 2, DRAINING: 3, STOPPED: 4, UNRESPONSIVE: 5}
#: How often a `--processes` child writes its report; one older than STALE_SECONDS is not believed.
REPORT_SECONDS = 0.5
STALE_SECONDS = 5.0
PATHS = ("/metrics", "/livez", "/readyz")
#: Set in every container Kubernetes runs: there the endpoint listens on ANY_HOST unless told.
KUBERNETES_ENV = "KUBERNETES_SERVICE_HOST"
ANY_HOST, LOOPBACK_HOST = "0.0.0.0", "127.0.0.1"

Report = dict[str, Any]
#: For `/metrics`: the request's Accept header -> the body and its content type.
Render = Callable[[str], tuple[bytes, str]]


def worst(states: Iterable[str]) -> str:
    """The state of several consumers or processes as one: the least ready of them (STARTING: none)."""
    return max(states, key=lambda state: _RANK.get(state, len(_RANK)), default=STARTING)


class Health(Observer):
    """Tracks the consumers of this process (their states, the connection) and its event loop.

    An observer: `Project(observers=[health])`, then `with health.serve(port=8080):` serves
    `/livez` and `/readyz` (`PrometheusMetrics` has one and serves `/metrics` beside it). The loop
    is watched while it serves or reports, from the first hook or `serve()` on that loop.
    """

    def __init__(self, *, max_blocked: float = MAX_BLOCKED_SECONDS) -> None:
        if not max_blocked > 0:
            raise ConfigurationError(f"max_blocked must be more than 0 seconds (got {max_blocked})")
        self.max_blocked = max_blocked
        self._lock = threading.Lock()
        self._workers: dict[str, str] = {}
        self._connected = True
        self._blocked: str | None = None
        self._watchers = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog: LoopWatchdog | None = None

    # -- hooks -----------------------------------------------------------------------------

    def consumer_state(self, worker: str, state: str) -> None:
        with self._lock:
            self._workers[worker] = state
        self._watch_loop()

    def connection(self, up: bool) -> None:
        self._connected = up
        if not up:
            self._blocked = None  # a new connection starts unblocked
        self._watch_loop()

    def connection_blocked(self, reason: str | None) -> None:
        self._blocked = reason

    # -- what it says ----------------------------------------------------------------------

    def states(self) -> dict[str, str]:
        """Each consumer's state as health sees it: a ready one is RECONNECTING while the connection is down."""
        with self._lock:
            workers = dict(self._workers)
        if self._connected:
            return workers
        return {worker: RECONNECTING if state == READY else state for worker, state in workers.items()}

    def blocked_seconds(self) -> float:
        """How long the watched event loop has not answered (0 when none is watched)."""
        loop, watchdog = self._loop, self._watchdog
        if loop is None or watchdog is None or loop.is_closed():
            return 0.0
        return round(watchdog.blocked_for(), 3)

    def report(self) -> Report:
        """What `/livez` and `/readyz` answer: `live` and `ready` decide their status code."""
        workers = self.states()
        state = worst(workers.values())
        blocked = self.blocked_seconds()
        return {
            "live": blocked < self.max_blocked,
            "ready": state == READY,
            "state": state,
            "workers": workers,
            # Blocked (a resource alarm) is not down: consuming goes on, publishes wait; still ready.
            "connection": "down" if not self._connected else "up" if self._blocked is None else "blocked",
            "blocked_reason": self._blocked,
            "blocked_seconds": blocked,
            "max_blocked_seconds": self.max_blocked,
            "pid": os.getpid(),
        }

    # -- serving ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def serve(self, *, port: int, host: str | None = None, render: Render | None = None) -> Iterator[int]:
        """Serve `/livez`, `/readyz` (and `/metrics` through `render`) on `host:port` from a thread
        until the block ends; yields the port (port 0: a free one). `host` by default: `default_host()`,
        0.0.0.0 in a Kubernetes pod, else 127.0.0.1. MetricsPortError when it cannot listen there."""
        with self.watching(), serve(default_host() if host is None else host, port, self.report, render) as bound:
            yield bound

    @contextlib.contextmanager
    def report_to(self, directory: Path, tick: Callable[[], None] | None = None) -> Iterator[None]:
        """Write `report()` to `directory/health.<pid>.json` every REPORT_SECONDS from a thread, for a
        supervisor to serve (`Children`); `tick` runs before each write."""
        path = directory / f"health.{os.getpid()}.json"
        halt = threading.Event()

        def write() -> None:
            while True:
                try:
                    if tick is not None:
                        tick()
                    _write_atomically(path, orjson.dumps({**self.report(), "written_at": time.time()}))
                except Exception as exc:  # noqa: BLE001 - the report goes stale, and says so
                    log.error("cannot write the health report %s: %s", path, exc)
                if halt.wait(REPORT_SECONDS):
                    return

        thread = threading.Thread(target=write, name="nobs-health", daemon=True)
        with self.watching():
            thread.start()
            try:
                yield
            finally:
                halt.set()
                thread.join(5)

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Watch the event loop while the block runs (from a hook on it, or now if one runs)."""
        self._watchers += 1
        self._watch_loop()
        try:
            yield
        finally:
            self._watchers -= 1
            if not self._watchers and self._watchdog is not None:
                self._watchdog.stop()
                self._loop = self._watchdog = None

    def _watch_loop(self) -> None:
        if not self._watchers:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if loop is self._loop:
            return
        if self._watchdog is not None:
            self._watchdog.stop()
        # Silent (an infinite threshold): the consumer's own watchdog logs what blocks the loop.
        self._loop, self._watchdog = loop, LoopWatchdog(loop, {}, threshold=math.inf)
        self._watchdog.start()


class Children:
    """The health of a supervisor's `processes` worker processes, from the reports they write
    into `directory`, as one: live when each is, ready when all are."""

    def __init__(self, directory: Path, processes: int, *, worker: str, max_blocked: float) -> None:
        self.directory = directory
        self.processes = processes
        self.worker = worker
        self.max_blocked = max_blocked
        #: Worker processes that exited and were replaced.
        self.restarts = 0

    def exited(self, pid: int) -> None:
        """Worker process `pid` exited (and is being replaced): its report no longer counts."""
        self.restarts += 1
        with contextlib.suppress(FileNotFoundError):
            (self.directory / f"health.{pid}.json").unlink()

    def report(self) -> Report:
        now = time.time()
        processes = [self._child(path, now) for path in sorted(self.directory.glob("health.*.json"))]
        children = [child for child in processes if child is not None]
        missing = max(0, self.processes - len(children))
        state = worst([*(child["state"] for child in children), *[STARTING] * missing])
        return {
            "live": all(child["live"] for child in children),
            "ready": state == READY,
            "state": state,
            "worker": self.worker,
            "processes": children,
            "expected_processes": self.processes,
            "restarts": self.restarts,
            "blocked_seconds": max((child["blocked_seconds"] for child in children), default=0.0),
            "max_blocked_seconds": self.max_blocked,
            "pid": os.getpid(),
        }

    def _child(self, path: Path, now: float) -> Report | None:
        try:
            written = orjson.loads(path.read_bytes())
            age = max(0.0, now - float(written["written_at"]))
            blocked = float(written["blocked_seconds"])
            state = str(written["state"]) if age < STALE_SECONDS else UNRESPONSIVE
            return {
                "pid": int(written["pid"]),
                "live": age < STALE_SECONDS and blocked < self.max_blocked,
                "ready": state == READY,
                "state": state,
                "workers": written["workers"],
                "connection": written["connection"],
                "blocked_seconds": blocked,
                "report_age_seconds": round(age, 3),
            }
        except (OSError, ValueError, KeyError, TypeError):  # gone with its process, or half-written
            return None


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".tmp")
    partial.write_bytes(data)
    os.replace(partial, path)


# -- the HTTP endpoint ------------------------------------------------------------------------


def default_host(environ: Mapping[str, str] = os.environ) -> str:
    """Where the endpoint listens unless told: every address inside a Kubernetes pod (the kubelet's
    probes and Prometheus come to the pod's IP), else loopback only (a laptop's is not the LAN's)."""
    return ANY_HOST if environ.get(KUBERNETES_ENV) else LOOPBACK_HOST


@contextlib.contextmanager
def serve(host: str, port: int, report: Callable[[], Report], render: Render | None) -> Iterator[int]:
    """Answer `/livez` and `/readyz` with `report()`, and `/metrics` with `render`, on `host:port`
    from a thread until the block ends; yields the port. MetricsPortError when it cannot listen."""
    try:
        sock = httpserve.listen(host, port)
    except OSError as exc:  # in use, not allowed, or no such address
        if exc.errno == errno.EADDRINUSE:
            fix = "pick another port (--metrics-port) or stop what listens there"
        else:
            fix = "check the address (--metrics-host) and the port"
        raise MetricsPortError(host, port, (exc.strerror or str(exc)).lower(), fix) from exc
    bound = int(sock.getsockname()[1])
    with httpserve.serving(sock, _responder(report, render)):
        shown = f"[{host}]" if ":" in host else host
        log.info("metrics and health on http://%s:%d (%s)", shown, bound, ", ".join(_paths(render)))
        yield bound


def _responder(report: Callable[[], Report], render: Render | None) -> httpserve.Respond:
    def respond(target: str, accept: str) -> tuple[int, bytes, str]:
        path = urlsplit(target).path
        if path == "/metrics" and render is not None:
            body, content_type = render(accept)
            return 200, body, content_type
        if path in ("/livez", "/readyz"):
            answer = report()
            good = answer["live"] if path == "/livez" else answer["ready"]
            return 200 if good else 503, orjson.dumps(answer), "application/json"
        return 404, orjson.dumps({"error": f"nothing at {path}", "paths": _paths(render)}), "application/json"

    return respond


def _paths(render: Render | None) -> list[str]:
    return [path for path in PATHS if path != "/metrics" or render is not None]
