"""What `Worker.queue()` returns: the message id, and (when asked for) the way to its result."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from .errors import ResultLostError, ResultNotRequestedError, ResultTimeoutError
from .message import Message
from .results import Decode, Results, value_of

#: How long `result()` waits unless told otherwise.
RESULT_TIMEOUT = 60.0
_FORGOTTEN = "an earlier result() of it timed out or was cancelled, and its reply is no longer received"


class Queued(str):
    """A queued task: equal to (and usable as) its message id. `await handle.result()` is its
    return value when it was queued with `result=True`."""

    message_id: str
    #: The name of the worker it was queued on.
    worker: str
    #: Not queued: `queue(..., unique=...)` found the same id queued within its window.
    duplicate: bool

    def __new__(
        cls,
        message_id: str,
        worker: str,
        *,
        results: Results | None = None,
        waiting: asyncio.Future[Message] | None = None,
        decode: Decode | None = None,
        duplicate: bool = False,
    ) -> Queued:
        handle = super().__new__(cls, message_id)
        handle.message_id = message_id
        handle.worker = worker
        handle.duplicate = duplicate
        handle._results = results
        handle._waiting = waiting
        handle._decode = decode
        return handle

    _results: Results | None
    _waiting: asyncio.Future[Message] | None
    _decode: Decode | None

    def __repr__(self) -> str:
        duplicate = ", duplicate=True" if self.duplicate else ""
        return f"Queued({self.message_id!r}, worker={self.worker!r}{duplicate})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (str, (self.message_id,))  # pickled (or copied) as the plain id: a result is this process's

    async def result(self, timeout: float | None = RESULT_TIMEOUT) -> Any:  # noqa: ASYNC109 - the API asked for
        """The task's return value, once it succeeded (after its retries): validated as the task's
        return annotation, else plain JSON (dict, list, str, int, float, bool, None).

        Raises `TaskFailedError` when it failed for good (dead-lettered), `ResultTimeoutError`
        (a TimeoutError) after `timeout` seconds (None: no limit), `ResultLostError` when the
        connection that would receive the result dropped, `ResultNotRequestedError` when it was
        queued without `result=True`. Once a `result()` timed out or was cancelled, the reply is
        no longer received: a later one raises `ResultLostError`."""
        waiting, results = self._waiting, self._results
        if self.duplicate:
            raise ResultNotRequestedError(self.message_id, duplicate=True)
        if waiting is None or results is None:
            raise ResultNotRequestedError(self.message_id)
        if waiting.cancelled():  # an earlier result() timed out or was cancelled
            raise ResultLostError(self.message_id, _FORGOTTEN)
        try:
            async with asyncio.timeout(timeout):
                reply = await asyncio.shield(waiting)
        except TimeoutError:
            if not waiting.done() or waiting.cancelled():
                results.forget(self.message_id)
                raise ResultTimeoutError(self.message_id, timeout) from None
            reply = waiting.result()
        except asyncio.CancelledError:
            results.forget(self.message_id)  # nobody waits for it now: its reply is dropped
            raise
        return value_of(reply, self._decode)


async def gather_results(
    handles: Iterable[Queued],
    *,
    timeout: float | None = RESULT_TIMEOUT,  # noqa: ASYNC109 - one deadline for all, as result() has
    return_exceptions: bool = False,
) -> list[Any]:
    """The results of `handles` (of any workers), in their order, within one `timeout` for all.
    Raises the first failure (in the handles' order) unless `return_exceptions=True`, which puts
    each failure in its place in the list instead."""
    handles = list(handles)
    loop = asyncio.get_running_loop()
    until = None if timeout is None else loop.time() + timeout
    outcomes = await asyncio.gather(
        *(handle.result(None if until is None else max(0.0, until - loop.time())) for handle in handles),
        return_exceptions=True,
    )
    if not return_exceptions:
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
    return outcomes
