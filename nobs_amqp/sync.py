"""Queueing from sync code (Django, Flask, sync FastAPI routes, scripts): `project.sync()`.

A `SyncProducer` owns one daemon I/O thread running one event loop, and on it one session of
the project (its own connection, publisher confirms), opened on first use. A call checks its
payload in the caller's thread, hands the publish to that loop (`run_coroutine_threadsafe`) and
waits for the broker's confirm: the same checks, errors and guarantees as `await worker.queue()`,
from any number of threads at once, never an event loop per call.

A producer opened before `os.fork()` (gunicorn `--preload`) is left to the parent: the child
opens its own connection the first time it queues. `close()` (also at interpreter exit) lets
the calls in flight finish, closes the connection and joins the thread, each bounded.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import contextvars
import os
import threading
import weakref
from collections.abc import Callable, Coroutine, Iterable
from types import TracebackType
from typing import Any, Protocol, TypeVar

from .errors import BlockingCallError, BrokerConnectionError, ProducerClosedError, PublishInterruptedError
from .session import Session
from .transports.base import one_deadline
from .urls import redact
from .worker import Delay, Extras, P, Worker


class Source(Protocol):
    """What a sync producer needs of its project (a `Project`)."""

    @property
    def name(self) -> str: ...

    @property
    def publish_timeout(self) -> float: ...

    @property
    def urls(self) -> tuple[str, ...]: ...

    async def connected(self) -> Session: ...

    #: Its producer, made by `made()`.
    _sync: SyncProducer | None


T = TypeVar("T")

#: Seconds a call waits for its I/O thread past its own deadline before giving up on it.
GRACE_SECONDS = 5.0
#: Seconds `close()` lets calls in flight finish, by default.
CLOSE_SECONDS = 10.0

_PRODUCERS: weakref.WeakSet[SyncProducer] = weakref.WeakSet()
#: I/O threads of a parent process, kept (never closed or collected) in a forked child.
_ABANDONED: list[object] = []


class _Loop:
    """One event loop on one daemon thread, and the session the producer connected on it."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=f"nobs-amqp sync {name}", daemon=True)
        self.session: Session | None = None
        self.calls: set[asyncio.Task[Any]] = set()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            left = asyncio.all_tasks(self.loop)  # what close() did not wait for
            for task in left:
                task.cancel()
            if left:
                self.loop.run_until_complete(asyncio.wait(left, timeout=1.0))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, T], context: contextvars.Context) -> concurrent.futures.Future[T]:
        """Run `coro` on the loop in `context` (the caller's: its trace, say); its future."""
        return asyncio.run_coroutine_threadsafe(self._tracked(coro, context), self.loop)

    async def _tracked(self, coro: Coroutine[Any, Any, T], context: contextvars.Context) -> T:
        task = asyncio.get_running_loop().create_task(coro, context=context)
        self.calls.add(task)
        try:
            return await task
        finally:
            self.calls.discard(task)

    async def shutdown(self, timeout: float) -> None:  # noqa: ASYNC109 - the caller's bound, in the loop
        """Let the calls in flight finish (cancelled after `timeout`), then close the connection
        (in what is left of `timeout`, at least 1 s)."""
        until = asyncio.get_running_loop().time() + timeout
        if self.calls:
            _, late = await asyncio.wait(set(self.calls), timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=1.0)
        if self.session is not None:
            with contextlib.suppress(Exception):  # closing: what failed is logged by the transport
                left = max(until - asyncio.get_running_loop().time(), 1.0)
                await asyncio.wait_for(self.session.transport.close(), timeout=left)

    def stop(self, timeout: float) -> None:
        """`shutdown()`, then stop the loop and join the thread, in about `timeout` + 4 s at most."""
        if self.thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.shutdown(timeout), self.loop).result(timeout + 2.0)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=2.0)


class SyncProducer:
    """Queues tasks from sync code through one background connection: get it with `project.sync()`.

    `producer.queue(worker, fn, payload)` does what `await worker.queue(fn, payload)` does and
    returns the message id once the broker confirmed it. It opens the producer on first use
    (`open()` does it up front, to fail at startup); `close()`, or the end of a `with` block,
    or interpreter exit closes it. `timeout` per call bounds all of it (at most, and by default,
    the project's `publish_timeout`): the errors it raises then say whether the message may be
    in the queue (`PublishError.maybe_sent`).
    """

    def __init__(self, project: Source) -> None:
        self.project = project
        self._lock = threading.Lock()
        self._io: _Loop | None = None
        self._closed = False
        _PRODUCERS.add(self)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._io is not None else "not open"
        return f"SyncProducer({self.project.name!r}, {state})"

    @property
    def is_open(self) -> bool:
        return self._io is not None

    @property
    def closed(self) -> bool:
        return self._closed

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> SyncProducer:
        """Start the I/O thread and connect (done by the first call otherwise); raises what
        `async with project:` raises (BrokerConnectionError, ConfigurationError)."""
        _not_in_loop("producer.open()")
        self._loop()
        return self

    def close(self, timeout: float = CLOSE_SECONDS) -> None:
        """Let the calls in flight finish (up to `timeout` s; those still waiting then raise
        `PublishInterruptedError`), close the connection and join the I/O thread. Once closed,
        every call raises `ProducerClosedError`; `project.sync()` makes a new producer."""
        self._stop(timeout, closing=True)

    def disconnect(self, timeout: float = CLOSE_SECONDS) -> None:
        """`close()` the connection and thread, but stay usable: the next call connects again,
        to where the project says then (`testing.use_broker` does it around a test)."""
        self._stop(timeout, closing=False)

    def _stop(self, timeout: float, *, closing: bool) -> None:
        with self._lock:
            io, self._io = self._io, None
            self._closed = self._closed or closing
        with contextlib.suppress(ValueError):
            atexit.unregister(self._at_exit)
        if io is not None:
            io.stop(timeout)

    def __enter__(self) -> SyncProducer:
        return self.open()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _at_exit(self) -> None:
        self.close()

    def _loop(self) -> _Loop:
        io = self._io
        if io is not None:
            return io
        with self._lock:
            if self._closed:
                raise ProducerClosedError(self.project.name)
            if self._io is None:
                self._io = self._started()
                atexit.register(self._at_exit)
            return self._io

    def _started(self) -> _Loop:
        io = _Loop(self.project.name)
        io.thread.start()
        seconds = self._default_timeout() + GRACE_SECONDS
        try:
            future = asyncio.run_coroutine_threadsafe(self.project.connected(), io.loop)
            try:
                io.session = future.result(seconds)
            except concurrent.futures.TimeoutError:
                future.cancel()
                where = ", ".join(redact(url) for url in self.project.urls)
                raise BrokerConnectionError(where, f"no connection within {seconds:.0f} s") from None
        except BaseException:
            io.stop(timeout=1.0)
            raise
        return io

    def _after_fork(self) -> None:
        """In a forked child: the parent's thread is gone and its connection is the parent's."""
        self._lock = threading.Lock()
        if self._io is not None:
            _ABANDONED.append(self._io)  # never closed here: that would close the parent's connection
            self._io = None

    # -- producing ---------------------------------------------------------------------------

    def queue(
        self,
        worker: Worker,
        fn: Callable[[P], object],
        payload: P,
        *,
        delay: Delay | None = None,
        priority: int | None = None,
        message_id: str | None = None,
        expires: Delay | None = None,
        unique: Delay | None = None,
        timeout: float | None = None,
    ) -> str:
        """`await worker.queue(fn, payload)` from sync code: the message id once confirmed.
        The payload is checked in this thread before anything is sent."""
        _not_in_loop("producer.queue()")
        checked = worker._checked(fn, payload, delay, priority)
        extras = Extras.checked(checked[2], priority, message_id, expires, unique)
        return self._call(worker.name, lambda session: worker._put(session, checked, extras), timeout)

    def queue_many(
        self,
        worker: Worker,
        fn: Callable[[P], object],
        payloads: Iterable[P],
        *,
        delay: Delay | None = None,
        priority: int | None = None,
        timeout: float | None = None,
    ) -> list[str]:
        """`await worker.queue_many(fn, payloads)` from sync code: every payload is checked
        (in this thread) before any is sent, the confirms are pipelined."""
        _not_in_loop("producer.queue_many()")
        checked = [worker._checked(fn, payload, delay, priority) for payload in payloads]
        extras = Extras(priority)
        return list(self._call(worker.name, lambda session: worker._put_many(session, checked, extras), timeout))

    def _call(
        self,
        destination: str,
        work: Callable[[Session], Coroutine[Any, Any, T]],
        timeout: float | None,
        *,
        deadline: bool = True,
    ) -> T:
        """Run `work(session)` on the I/O loop, within one deadline of `timeout` s; its result or
        its error, raised here. A wait that outlasts the deadline by GRACE_SECONDS gives up."""
        seconds = self._default_timeout() if timeout is None else timeout
        io = self._loop()
        session = io.session
        assert session is not None

        async def bounded() -> T:
            if not deadline:
                return await work(session)
            with one_deadline(seconds):
                return await work(session)

        with self._lock:  # close() cannot stop the loop between this check and the hand-over
            if self._io is not io:
                raise ProducerClosedError(self.project.name)
            future = io.submit(bounded(), contextvars.copy_context())
        try:
            return future.result(seconds + GRACE_SECONDS)
        except concurrent.futures.TimeoutError:
            future.cancel()
            waited = seconds + GRACE_SECONDS
            raise PublishInterruptedError(destination, f"did not finish within {waited:.0f} s") from None
        except concurrent.futures.CancelledError:
            raise PublishInterruptedError(destination, "was closed before it finished") from None

    def _default_timeout(self) -> float:
        return self.project.publish_timeout


def made(project: Source) -> SyncProducer:
    """`project`'s sync producer: made on first use, and again once it was closed."""
    with _MADE:
        producer = project._sync
        if producer is None or producer.closed:
            producer = project._sync = SyncProducer(project)
        return producer


_MADE = threading.Lock()


def _not_in_loop(call: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise BlockingCallError(call)


def _after_fork_in_child() -> None:
    global _MADE
    _MADE = threading.Lock()
    for producer in list(_PRODUCERS):
        producer._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
