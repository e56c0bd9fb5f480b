"""Task functions the tests queue. They record what happened so tests can assert on it."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from os.path import join  # noqa: F401 - a re-exported function a message must not reach
from pathlib import Path

import tenacity
from pydantic import BaseModel

from nobs_amqp import Reject, Retry, TaskContext, current_task, task

_lock = threading.Lock()
CALLS: dict[str, list[float]] = defaultdict(list)
THREADS: dict[str, str] = {}

NOT_A_FUNCTION = "a module attribute that is not a function"


def calls(key: str) -> list[float]:
    with _lock:
        return list(CALLS[key])


def _record(key: str) -> int:
    with _lock:
        CALLS[key].append(time.time())
        return len(CALLS[key])


class Job(BaseModel):
    key: str
    fail_times: int = 0
    sleep: float = 0.0


@dataclass
class SyncJob:
    key: str
    numbers: list[int]


async def record(job: Job) -> None:
    """Succeeds after failing `fail_times` times."""
    if job.sleep:
        await asyncio.sleep(job.sleep)
    if _record(job.key) <= job.fail_times:
        raise ConnectionError(f"flaky failure of {job.key}")


def record_sync(job: SyncJob) -> None:
    """A sync task: runs in the worker's thread pool."""
    with _lock:
        THREADS[job.key] = threading.current_thread().name
    _record(job.key)


async def always_fail(job: Job) -> None:
    _record(job.key)
    raise RuntimeError(f"boom {job.key}")


async def ask_retry(job: Job) -> None:
    if _record(job.key) == 1:
        raise Retry(delay=1)


async def reject(job: Job) -> None:
    _record(job.key)
    raise Reject("this payload is not for us")


async def too_slow(job: Job) -> None:
    _record(job.key)
    await asyncio.sleep(job.sleep)


class FileJob(BaseModel):
    """For tasks run in another process: effects are files in `folder`."""

    folder: str
    key: str
    sleep: float = 0.0


def _touch(job: FileJob, what: str) -> None:
    (Path(job.folder) / f"{job.key}.{what}.{os.getpid()}").write_text(str(time.time()))


async def slow_file(job: FileJob) -> None:
    _touch(job, "start")
    await asyncio.sleep(job.sleep)
    _touch(job, "done")


def crash(job: FileJob) -> None:
    """Kills its own worker process, as a segfault or the OOM killer would."""
    _touch(job, "start")
    os.kill(os.getpid(), signal.SIGKILL)


# -- for tests/rabbitmq/test_reliability.py ---------------------------------------------------------


async def exit_task(job: Job) -> None:
    """A task that calls sys.exit: its own failure, never the worker's end."""
    _record(job.key)
    raise SystemExit(0)


def interrupt_sync(job: SyncJob) -> None:
    _record(job.key)
    raise KeyboardInterrupt


@dataclass
class Hang:
    key: str
    seconds: float


def hang_sync(job: Hang) -> None:
    """Blocks its thread far past any time limit (bounded, so the test process can end)."""
    _record(job.key)
    time.sleep(job.seconds)


async def block_loop(job: FileJob) -> None:
    """Blocks the event loop: a sync sleep inside async def."""
    _touch(job, "start")
    time.sleep(job.sleep)  # noqa: ASYNC251 - the misbehaviour under test
    _touch(job, "done")


@dataclass
class Point:
    x: float
    y: float


class Readings(BaseModel):
    """Floats in each form a payload nests them: a list, a dict, dataclasses in a list, a model."""

    values: list[float] = []
    by_name: dict[str, float] = {}
    points: list[Point] = []
    latest: Job | None = None


async def store_readings(readings: Readings) -> None:
    _record(f"readings-{len(readings.values)}")


def total(values: dict[str, list[float]]) -> float:
    """Takes no request model: a project lists it in Project(tasks=[...]) to queue it."""
    return sum(sum(v) for v in values.values())


def scale(factor: float) -> float:
    """Takes no request model: a project lists it in Project(tasks=[...]) to queue it."""
    return factor


def helper_int(n: int) -> int:
    """A project helper, not a task: a message must not run it."""
    _record(f"helper-{n}")
    return n * 2


def main(argv: list[str]) -> None:
    """A CLI entry point in a task module: a message must not run it."""
    _record("main-" + "-".join(argv))


@dataclass
class Unvalidatable:
    lock: threading.Lock  # pydantic cannot build a schema for this


async def weird(job: Unvalidatable) -> None:
    _record("weird")


_LEAKED: list[bytes] = []


def leak(job: FileJob) -> None:
    """Keeps 64 MiB more alive each time it runs, as a task with a cache that never shrinks."""
    _LEAKED.append(os.urandom(1) * (64 * 2**20))
    _touch(job, "done")


async def stubborn(job: Job) -> None:
    """Swallows cancellation and goes on (for at most `sleep` seconds, so the test process can end)."""
    _record(job.key)
    deadline = time.monotonic() + job.sleep
    while time.monotonic() < deadline:
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            continue


# -- for bench/soak.py: runs counted across worker processes, in files ----------------------


class SoakJob(BaseModel):
    """`mode`: ok, fail_once (then succeeds), hang (past any time limit), exit (SystemExit),
    crash_once (SIGKILLs its worker on the first try only), crash (SIGKILLs it every time)."""

    folder: str
    key: str
    mode: str = "ok"
    sleep: float = 0.0


def _soak_line(job: SoakJob, what: str) -> None:
    # One short O_APPEND write per line: lines of concurrent tasks and processes never mix.
    with open(Path(job.folder) / f"runs.{os.getpid()}", "a") as out:
        out.write(f"{job.key} {what} {time.time():.3f}\n")


def _first_time(job: SoakJob, what: str) -> bool:
    """True the first time any process asks for this key and `what` (a marker file decides)."""
    try:
        (Path(job.folder) / f"{job.key}.{what}").touch(exist_ok=False)
    except FileExistsError:
        return False
    return True


async def soak(job: SoakJob) -> None:
    if job.sleep:
        await asyncio.sleep(job.sleep)
    if job.mode == "fail_once" and _first_time(job, "failed"):
        raise ConnectionError(f"first try of {job.key} fails")
    if job.mode == "hang":
        await asyncio.sleep(3600)
    if job.mode == "exit":
        raise SystemExit(3)
    if job.mode == "crash" or (job.mode == "crash_once" and _first_time(job, "crashed")):
        os.kill(os.getpid(), signal.SIGKILL)
    _soak_line(job, "ok")


# -- for tests/conformance/test_task_context.py ----------------------------------------------------------

#: What `current_task()` said inside each run, by job key.
CONTEXTS: dict[str, list[TaskContext]] = defaultdict(list)


async def with_context(job: Job) -> None:
    CONTEXTS[job.key].append(current_task())
    if _record(job.key) <= job.fail_times:
        raise RuntimeError(f"fail {job.key}")


def with_context_sync(job: SyncJob) -> None:
    CONTEXTS[job.key].append(current_task())
    _record(job.key)


@task(stop=tenacity.stop_after_attempt(2), wait=tenacity.wait_fixed(1))
async def gives_up_after_two(job: Job) -> None:
    _record(job.key)
    raise RuntimeError(f"still failing {job.key}")


@task(time_limit=0.3)
async def has_its_own_time_limit(job: Job) -> None:
    _record(job.key)
    await asyncio.sleep(5)


async def retries_with_a_reason(job: Job) -> None:
    _record(job.key)
    raise Retry(delay=1, reason=f"upstream answered 503 for {job.key}")


async def lifespan_pid(job: FileJob) -> None:
    """Leaves `<key>.state-<pid of the lifespan that opened the state>.<pid>` in the folder."""
    _touch(job, f"state-{current_task().state['pid']}")
