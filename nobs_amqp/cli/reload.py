"""`consume --reload`: restart the worker processes when a *.py file of the project changes (development).

A change asks every worker to stop with SIGTERM, their usual drain (running tasks finish within
the grace period, the rest goes back to the queue), and starts fresh processes, which import the
new code, once the old ones have exited. Files that change while the old workers drain join that
restart. A changed file with a syntax error keeps the new workers from starting, and a worker that
exits by itself (an error at start, a crash) is not started again: both wait for the next change.
SIGTERM/SIGINT are passed on as `supervisor.supervise` does (a second one stops at once).
"""

from __future__ import annotations

import importlib.util
import logging
import signal
import subprocess
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import FrameType

from ..errors import ConfigurationError
from ..project import Project
from .supervisor import RECYCLE_EXIT, ended, exit_status, spawn

log = logging.getLogger("nobs_amqp")

#: How often (ms) the watcher hands back control, to see whether a worker exited or a signal came.
POLL_MS = 200
#: Past the grace period, how long a draining worker gets before it is killed.
STOP_MARGIN_SECONDS = 10.0
#: Folders of installed code: never a source root.
INSTALLED = frozenset({"site-packages", "dist-packages"})
#: Folders never watched, besides hidden ones (whose name starts with a dot: .venv, .git, .tox...).
IGNORED_FOLDERS = frozenset({"__pycache__", "venv", "node_modules", *INSTALLED})
#: Changed files a log line names before it says how many more.
SHOWN_FILES = 3


def source_roots(project: Project, reference: str, found_in: Sequence[str]) -> list[Path]:
    """The folders whose *.py files `--reload` watches: the folder of the pyproject.toml that named
    the app (`found_in`), else the app's top-level package (for a lone module, its folder); and
    the folders of the project's packages outside those. Installed code (site-packages) is left out."""
    names = [reference.partition(":")[0], *sorted(project.allowlist.packages)]
    candidates = [Path(folder) for folder in found_in]
    candidates += [folder for name in names for folder in _folders(name.partition(".")[0])]
    roots: list[Path] = []
    for folder in sorted({c.resolve() for c in candidates if c.is_dir()}, key=lambda f: len(f.parts)):
        installed = not INSTALLED.isdisjoint(folder.parts)
        if not installed and not any(folder.is_relative_to(root) for root in roots):
            roots.append(folder)
    if not roots:
        raise ConfigurationError(
            f"--reload found no source folder of {reference} to watch (it is installed, not a checkout): "
            f"install it with `pip install -e .` or run from its source folder"
        )
    return roots


def _folders(top: str) -> list[Path]:
    """Where the top-level module or package `top` lives (a lone module: its folder); [] if nowhere."""
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    if spec.submodule_search_locations is not None:
        return [Path(location) for location in spec.submodule_search_locations]
    return [Path(spec.origin).parent] if spec.has_location and spec.origin else []


class SourceFilter:
    """Keeps the *.py files under the roots, leaving out hidden folders (.venv, .git), caches,
    virtualenvs and editors' temporary files. Only the part below a root counts, so a project
    that lives inside a hidden folder is still watched."""

    def __init__(self, roots: Iterable[Path]) -> None:
        self.roots = tuple(roots)

    def __call__(self, change: object, path: str) -> bool:
        file = Path(path)
        if file.suffix != ".py" or file.name.startswith("flycheck_"):
            return False
        root = next((root for root in self.roots if file.is_relative_to(root)), None)
        if root is None:
            return False
        parts = file.relative_to(root).parts
        return not any(part.startswith(".") or part in IGNORED_FOLDERS for part in parts)


def syntax_error(path: Path) -> str | None:
    """Where and what the syntax error in `path` is, or None (also for a file that cannot be read:
    the worker says what is wrong with it)."""
    try:
        source = path.read_bytes()
    except OSError:
        return None
    try:
        with warnings.catch_warnings():  # e.g. an invalid escape: the worker's import says it
            warnings.simplefilter("ignore")
            compile(source, str(path), "exec", dont_inherit=True)
    except SyntaxError as exc:
        return f"{shown([path])} line {exc.lineno}: {exc.msg}"
    except ValueError as exc:  # null bytes
        return f"{shown([path])}: {exc}"
    return None


def shown(paths: Iterable[Path]) -> str:
    """File names for a log line: relative to the current folder when under it."""
    here = Path.cwd()
    names = sorted(str(p.relative_to(here)) if p.is_relative_to(here) else str(p) for p in paths)
    more = f" and {len(names) - SHOWN_FILES} more" if len(names) > SHOWN_FILES else ""
    return ", ".join(names[:SHOWN_FILES]) + more


def _which(children: Sequence[subprocess.Popen[bytes]]) -> str:
    if len(children) == 1:
        return f"the worker (pid {children[0].pid})"
    return f"{len(children)} worker processes (pids {[c.pid for c in children]})"


def reloading(command: Sequence[str], processes: int, roots: Sequence[Path], *, grace_period: float) -> int:
    """Run `processes` copies of `command`, restarted on every change of a *.py file under `roots`,
    until SIGTERM/SIGINT; then 0 once they stopped cleanly."""
    if importlib.util.find_spec("watchfiles") is None:
        raise ConfigurationError("--reload needs watchfiles: pip install 'nobs_amqp[reload]'")
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:  # it logs every batch of changes
        logging.getLogger("watchfiles").setLevel(logging.WARNING)
    return Reloader(command, processes, roots, grace_period).run()


class Reloader:
    """The loop of `reloading`: the watcher hands back control every POLL_MS, with the changes
    since; a restart in progress waits (without blocking the loop) for the old workers to exit."""

    def __init__(self, command: Sequence[str], processes: int, roots: Sequence[Path], grace_period: float) -> None:
        self.command = list(command)
        self.processes = processes
        self.roots = list(roots)
        self.grace_period = grace_period
        self.children: list[subprocess.Popen[bytes]] = []
        self.old: list[subprocess.Popen[bytes]] = []  # draining for a restart
        self.restarting = False
        self.deadline = 0.0  # for the old workers to exit
        self.broken: dict[Path, str] = {}  # changed files with a syntax error
        self.asked: set[subprocess.Popen[bytes]] = set()  # sent a signal to stop (pids get reused)
        self.signals = 0
        self.stop = threading.Event()

    def run(self) -> int:
        from watchfiles import watch

        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            log.info("reload: watching *.py under %s", ", ".join(str(root) for root in self.roots))
            self._start(self.processes)
            for changes in watch(
                *self.roots,
                watch_filter=SourceFilter(self.roots),
                stop_event=self.stop,
                rust_timeout=POLL_MS,
                yield_on_timeout=True,
                raise_interrupt=False,
            ):
                if changes:
                    self._changed({Path(path) for _, path in changes})
                self._tick()
            return self._stopped()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """The first signal goes to each worker not already draining, a second one to all (it stops
        them at once). The loop ends; no worker starts after it."""
        self.signals += 1
        self.stop.set()
        for child in [*self.old, *self.children]:
            if child.poll() is None and (self.signals > 1 or child not in self.asked):
                self._ask(child, signum)

    def _ask(self, child: subprocess.Popen[bytes], signum: int) -> None:
        self.asked.add(child)
        child.send_signal(signum)

    def _changed(self, paths: set[Path]) -> None:
        for path in paths:
            problem = syntax_error(path) if path.exists() else None
            if problem is None:
                self.broken.pop(path, None)
            else:
                self.broken[path] = problem
        if self.stop.is_set() or self.restarting:  # stopping; or these join the restart under way
            return
        running = [child for child in self.children if child.poll() is None]
        if running:
            log.info("reload: %s changed; restarting %s, running tasks finish first", shown(paths), _which(running))
        else:
            log.info("reload: %s changed; starting %s", shown(paths), self._what())
        for child in running:
            self._ask(child, signal.SIGTERM)
        self.restarting, self.deadline = True, time.monotonic() + self.grace_period + STOP_MARGIN_SECONDS
        self.old, self.children = running, []

    def _tick(self) -> None:
        if self.stop.is_set():
            return
        if self.restarting:
            if any(child.poll() is None for child in self.old) and time.monotonic() < self.deadline:
                return
            self._kill(self.old)
            self.asked.difference_update(self.old)
            self.old, self.restarting = [], False
            if self.broken:
                for problem in self.broken.values():
                    log.error("reload: syntax error in %s; %s starts once a change fixes it", problem, self._what())
                return
            self._start(self.processes)
            return
        for child in [c for c in self.children if c.poll() is not None]:
            self.children.remove(child)
            if child.returncode == RECYCLE_EXIT:
                log.warning("reload: worker pid %d replaced itself (it leaked memory or threads)", child.pid)
                self._start(1)
            else:
                log.warning(
                    "reload: worker pid %d %s; it starts again at the next change", child.pid, ended(child.returncode)
                )

    def _start(self, count: int) -> None:
        started = []
        for _ in range(count):
            child = spawn(self.command)
            self.children.append(child)
            started.append(child)
            if self.stop.is_set() and child not in self.asked:  # a signal came while it started
                self._ask(child, signal.SIGTERM)
        log.info("reload: started %s", _which(started))

    def _what(self) -> str:
        return "the worker" if self.processes == 1 else f"{self.processes} worker processes"

    def _kill(self, children: Sequence[subprocess.Popen[bytes]]) -> bool:
        """Kill those of `children` still running (past their grace period); whether there were any."""
        stuck = [child for child in children if child.poll() is None]
        for child in stuck:
            log.error("reload: worker pid %d did not stop within its grace period; killing it", child.pid)
            child.kill()
            child.wait()
        return bool(stuck)

    def _stopped(self) -> int:
        """After a signal: wait for the workers (they drain); 0 when every one stopped cleanly."""
        everyone = [*self.old, *self.children]
        deadline = time.monotonic() + self.grace_period + STOP_MARGIN_SECONDS
        while any(child.poll() is None for child in everyone) and time.monotonic() < deadline:
            time.sleep(POLL_MS / 1000)
        if self._kill(everyone):
            return 1
        code = exit_status(everyone, "reload")
        log.info("reload: stopped")
        return code
