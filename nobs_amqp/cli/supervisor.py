"""`consume --processes N`: run N worker processes, restart one that dies, stop them all on a signal."""

from __future__ import annotations

import functools
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType, ModuleType

log = logging.getLogger("nobs_amqp")

POLL_SECONDS = 0.2
RESTART_PAUSE_SECONDS = 1.0
PR_SET_PDEATHSIG = 1
#: Exit code of a worker that stopped itself to be replaced (EX_TEMPFAIL: a service manager restarts it).
RECYCLE_EXIT = 75


def spawn(command: Sequence[str]) -> subprocess.Popen[bytes]:
    """A worker process running `command`, which gets SIGTERM should this process die."""
    if sys.platform != "linux":
        return subprocess.Popen(command)
    import ctypes  # here, not at import (a plain worker never spawns) and not in the child after fork

    return subprocess.Popen(command, preexec_fn=functools.partial(_stop_with_parent, ctypes))


def _stop_with_parent(ctypes: ModuleType) -> None:
    """In the child, before exec: get SIGTERM (and drain) if the supervisor dies, even by kill -9."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _replace(
    child: subprocess.Popen[bytes],
    command: Sequence[str],
    stopping: Callable[[], bool],
    on_exit: Callable[[int], None] | None = None,
) -> subprocess.Popen[bytes]:
    """A new worker in place of `child`, which exited (unless a signal came meanwhile)."""
    code = child.returncode
    why = "replaced itself (it leaked memory or threads)" if code == RECYCLE_EXIT else ended(code)
    log.warning("supervisor: worker pid %d %s; restarting it", child.pid, why)
    if on_exit is not None:
        on_exit(child.pid)
    time.sleep(RESTART_PAUSE_SECONDS)
    if stopping():  # a signal came during the pause: nothing to restart
        return child
    new = spawn(command)
    if stopping():  # ... or while it started: it was not among those signalled
        new.send_signal(signal.SIGTERM)
    return new


def supervise(
    command: Sequence[str],
    processes: int,
    *,
    restart: bool,
    grace_period: float,
    on_exit: Callable[[int], None] | None = None,
) -> int:
    """Run `processes` copies of `command` until a signal (or, without `restart`, until all exit).

    SIGTERM/SIGINT are passed on to every child, which drains and exits 0; the exit code is
    0 when every child ended with 0. `on_exit(pid)` is called for a child that exited and is replaced.
    """
    children = [spawn(command) for _ in range(processes)]
    log.info("supervisor: started %d worker processes (pids %s)", processes, [c.pid for c in children])
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while any(c.poll() is None for c in children) or (restart and not stopping):
            for i, child in enumerate(children):
                if restart and not stopping and child.poll() is not None:
                    children[i] = _replace(child, command, lambda: stopping, on_exit)
            time.sleep(POLL_SECONDS)
        deadline = time.monotonic() + grace_period + 10
        for child in children:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return exit_status(children, "supervisor")


def ended(code: int) -> str:
    """How a child with exit status `code` ended, for a log line."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def exit_status(children: Sequence[subprocess.Popen[bytes]], who: str) -> int:
    """The exit code of a supervisor whose `children` all ended after it passed a stop signal on:
    0 when each drained and exited 0 (or recycled itself), else the first failure's code, a
    signal's as a shell gives it (128 + its number).

    A child that a passed-on SIGTERM or SIGINT ended outright had not set up its handler yet: it was
    still starting, held no message, and stopped as asked.
    """
    failed = []
    for child in children:
        code = child.returncode
        if code in (0, RECYCLE_EXIT):  # a recycled child drained first
            continue
        if code in (-signal.SIGTERM, -signal.SIGINT):
            name = signal.Signals(-code).name
            log.info("%s: worker pid %d was stopped by %s while starting, before it took a task", who, child.pid, name)
            continue
        log.warning("%s: worker pid %d %s", who, child.pid, ended(code))
        failed.append(128 - code if code < 0 else code)
    return failed[0] if failed else 0
