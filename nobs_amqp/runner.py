"""Running one task: on the loop or in a thread of its own, within its time limit, contained.

Whatever a task does is its own failure: an exception of any kind (`SystemExit` and
`KeyboardInterrupt` included) comes back as `TaskAborted` or the exception itself, never
as something that stops the worker. The time limit counts the task's own run only: a
sync task gets a thread the moment it starts (the consumer's slots bound how many run),
so it never waits behind a thread that is stuck past its limit. A thread that will not
stop cannot be killed in Python: it is counted and reported, and the worker goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import os
import resource
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from .errors import TaskAborted, TimeLimitExceeded
from .message import printable

log = logging.getLogger("nobs_amqp")

#: How long a cancelled async task may take to end before it counts as stuck.
CANCEL_GRACE_SECONDS = 1.0


class Label:
    """What a running task is, as the watchdog names it (made into text only when it is told)."""

    __slots__ = ("message_id", "task")

    def __init__(self, task: str, message_id: str) -> None:
        self.task = task
        self.message_id = message_id

    def __str__(self) -> str:
        return f"task {self.task} id {printable(self.message_id)}"


class TaskRunner:
    """Calls task functions for one consumer. `stuck` counts threads still running past their limit."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._numbers = itertools.count(1)
        self._stuck: set[threading.Thread] = set()
        self._stuck_tasks: set[asyncio.Future[object]] = set()
        #: What each running asyncio task is doing, for the watchdog: task -> "task reference id X".
        self.labels: dict[asyncio.Task[Any], Label | str] = {}

    @property
    def stuck(self) -> int:
        """Threads and async tasks still running past their time limit."""
        self._stuck = {t for t in self._stuck if t.is_alive()}
        self._stuck_tasks = {t for t in self._stuck_tasks if not t.done()}
        return len(self._stuck) + len(self._stuck_tasks)

    async def call(
        self, fn: Callable[[Any], Any], payload: object, *, is_async: bool, limit: float | None, label: Label | str
    ) -> object:
        """Run `fn(payload)`; what it returned. Raise what it raised (TaskAborted for a
        BaseException), or TimeLimitExceeded once it ran `limit` seconds."""
        if is_async and limit is None:
            return await self._inline(fn, payload, label)
        work: asyncio.Future[object]
        thread: threading.Thread | None = None
        if is_async:
            work = asyncio.ensure_future(_contained(fn, payload))
            self.labels[work] = label
            work.add_done_callback(self.labels.pop)
        else:
            loop = asyncio.get_running_loop()
            work = loop.create_future()
            # The thread runs in a copy of this context: current_task() works there too.
            context = contextvars.copy_context()
            thread = threading.Thread(
                target=context.run,
                args=(_in_thread, fn, payload, loop, work),
                name=f"nobs-{self._name}-{next(self._numbers)}",
                daemon=True,
            )
            thread.start()
        try:
            finished, _ = await asyncio.wait({work}, timeout=limit)
        except asyncio.CancelledError:  # the worker's own shutdown: the task goes with it
            work.cancel()
            raise
        if finished:
            if work.cancelled():
                raise TaskAborted("the task cancelled itself (it raised CancelledError)")
            return work.result()
        work.cancel()
        # Whatever it ends with later is the past: nobody waits for it.
        work.add_done_callback(lambda f: f.cancelled() or f.exception())
        if thread is not None:
            self._stuck.add(thread)
            log.error(
                "worker %s: thread %s still runs its task past the time limit; it cannot be stopped, "
                "the worker goes on without it (%d stuck)",
                self._name,
                thread.name,
                self.stuck,
            )
        elif not (await asyncio.wait({work}, timeout=CANCEL_GRACE_SECONDS))[0]:
            self._stuck_tasks.add(work)
            log.error("worker %s: %s ignores cancellation past its time limit; it keeps running", self._name, label)
        raise TimeLimitExceeded(f"task ran longer than its time limit of {limit} s")

    async def _inline(self, fn: Callable[[Any], Any], payload: object, label: Label | str) -> object:
        """An async task with no time limit: awaited in the caller's own asyncio task (no task
        of its own to create, schedule and wait for), contained all the same."""
        task = asyncio.current_task()
        assert task is not None
        self.labels[task] = label
        try:
            return await fn(payload)
        except (SystemExit, KeyboardInterrupt, GeneratorExit) as exc:
            raise TaskAborted(f"the task raised {type(exc).__name__}({printable(exc)})") from exc
        except asyncio.CancelledError:
            if task.cancelling():  # the worker's own shutdown: the task goes with it
                raise
            raise TaskAborted("the task cancelled itself (it raised CancelledError)") from None
        finally:
            del self.labels[task]


async def _contained(fn: Callable[[Any], Coroutine[Any, Any, Any]], payload: object) -> object:
    try:
        return await fn(payload)
    except (SystemExit, KeyboardInterrupt, GeneratorExit) as exc:
        raise TaskAborted(f"the task raised {type(exc).__name__}({printable(exc)})") from exc


def _in_thread(
    fn: Callable[[Any], Any], payload: object, loop: asyncio.AbstractEventLoop, done: asyncio.Future[object]
) -> None:
    error: BaseException | None = None
    value: object = None
    try:
        value = fn(payload)
    except Exception as exc:  # noqa: BLE001 - handed to the loop as the task's failure
        error = exc
    except BaseException as exc:  # noqa: BLE001 - SystemExit in a task thread is the task's failure too
        error = TaskAborted(f"the task raised {type(exc).__name__}({printable(exc)})")
        error.__cause__ = exc
    with contextlib.suppress(RuntimeError):  # the loop is closed: the worker is gone anyway
        loop.call_soon_threadsafe(_resolve, done, error, value)


def _resolve(done: asyncio.Future[object], error: BaseException | None, value: object = None) -> None:
    if done.done():
        return
    if error is None:
        done.set_result(value)
    else:
        done.set_exception(error)


def resident_mb() -> float:
    """This process's resident memory now (Linux), else its peak."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
