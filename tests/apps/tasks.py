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

from pydantic import BaseModel

from nobs_amqp import Reject, Retry

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
