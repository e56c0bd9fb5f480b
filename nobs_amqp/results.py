"""Results: the replies a worker sends to a caller that awaits a task, and the caller's side.

A reply is a small transient message to the caller's direct reply-to address (see
`transports/amqp/replies.py`): its `correlation_id` and `message_id` are the id the caller
awaits, `x-nobs-result` says how the task ended ("ok": the body is the return value as
JSON; "failed": reason, error type and message in the `x-nobs-*` headers of a dead letter;
"unreadable": it succeeded, but its return value is not JSON). With a signing key, replies
are signed too, and a caller drops one that is not.

`Results` is one session's registry of what is awaited: a future per id, removed when its
reply comes, when the caller stops waiting, or (failed with `ResultLostError`) when the
connection that would receive the replies is lost. A reply for an id nobody awaits is dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

import orjson
from pydantic import ValidationError

from . import message as wire
from .errors import ResultLostError, ResultUnreadableError, TaskFailedError
from .message import DIRECT_REPLY_TO, ERROR_MESSAGE, ERROR_TYPE, REASON, Message, printable
from .signing import Signer

log = logging.getLogger("nobs_amqp")

RESULT = "x-nobs-result"
#: In a chain's failure reply: which step failed, "2 of 3".
STEP = "x-nobs-step"
OK, FAILED, UNREADABLE = "ok", "failed", "unreadable"

#: How a caller reads a successful result's body: a pydantic TypeAdapter's validate_json, or orjson.loads.
Decode = Callable[[bytes], Any]


def success(task: str, reply_id: str, body: bytes, app_id: str, now: datetime) -> Message:
    return _reply(task, reply_id, body, app_id, now, {RESULT: OK})


def failure(
    task: str,
    reply_id: str,
    app_id: str,
    now: datetime,
    reason: str,
    error: BaseException | str | None,
    step: str | None = None,
) -> Message:
    headers: dict[str, object] = {RESULT: FAILED, REASON: reason}
    if isinstance(error, BaseException):
        headers[ERROR_TYPE] = f"{type(error).__module__}.{type(error).__qualname__}"
        headers[ERROR_MESSAGE] = printable(error, wire.MAX_ERROR_MESSAGE)
    elif error is not None:
        headers[ERROR_MESSAGE] = printable(error, wire.MAX_ERROR_MESSAGE)
    if step is not None:
        headers[STEP] = step
    return _reply(task, reply_id, b"null", app_id, now, headers)


def unreadable(task: str, reply_id: str, app_id: str, now: datetime, detail: str) -> Message:
    headers: dict[str, object] = {RESULT: UNREADABLE, ERROR_MESSAGE: printable(detail, wire.MAX_ERROR_MESSAGE)}
    return _reply(task, reply_id, b"null", app_id, now, headers)


def _reply(task: str, reply_id: str, body: bytes, app_id: str, now: datetime, headers: dict[str, object]) -> Message:
    return Message(body, task, reply_id, app_id, now, headers, None, None, reply_id)


def value_of(reply: Message, decode: Decode | None) -> Any:
    """What `reply` says the task returned (decoded by `decode`, else as plain JSON), or raise why not."""
    status = reply.headers.get(RESULT)
    if status == OK:
        try:
            return decode(reply.body) if decode is not None else orjson.loads(reply.body)
        except (ValidationError, orjson.JSONDecodeError) as exc:
            raise ResultUnreadableError(reply.task, reply.message_id, printable(exc, 500)) from exc
    if status == UNREADABLE:
        raise ResultUnreadableError(reply.task, reply.message_id, _text(reply, ERROR_MESSAGE) or "no detail")
    raise TaskFailedError(
        reply.task,
        reply.message_id,
        _text(reply, REASON) or "unknown",
        _text(reply, ERROR_TYPE),
        _text(reply, ERROR_MESSAGE),
        step=_text(reply, STEP),
    )


def _text(reply: Message, header: str) -> str | None:
    value = reply.headers.get(header)
    return printable(value, wire.MAX_ERROR_MESSAGE) if isinstance(value, str) else None


class Results:
    """The results one session awaits (a `transports.base.Inbox`)."""

    def __init__(self, signer: Signer | None) -> None:
        self._signer = signer
        self._awaited: dict[str, asyncio.Future[Message]] = {}

    def __len__(self) -> int:
        return len(self._awaited)

    def expect(self, reply_id: str) -> asyncio.Future[Message]:
        """The future of the reply to `reply_id` (made now: before its request is published)."""
        future = self._awaited.get(reply_id)
        if future is None:
            future = self._awaited[reply_id] = asyncio.get_running_loop().create_future()
        return future

    def forget(self, reply_id: str) -> None:
        """Nobody waits for `reply_id` any more: a reply that still comes is dropped."""
        future = self._awaited.pop(reply_id, None)
        if future is not None and not future.done():
            future.cancel()

    def replied(self, reply: Message) -> None:
        reply_id = reply.correlation_id
        if reply_id is None or reply_id not in self._awaited:
            log.debug("dropped a reply for %s: nobody waits for it", printable(reply_id))
            return
        if self._signer is not None:
            problem = self._signer.problem(reply, DIRECT_REPLY_TO)
            if problem is None and reply.message_id != reply_id:
                problem = "its correlation id is not the id it was signed for"
            if problem is not None:
                log.warning("dropped a reply for %s: %s", printable(reply_id), problem)
                return
        future = self._awaited.pop(reply_id)
        if not future.done():
            future.set_result(reply)

    def lost(self, why: str) -> None:
        awaited, self._awaited = self._awaited, {}
        for reply_id, future in awaited.items():
            if not future.done():
                future.set_exception(ResultLostError(reply_id, why))
                future.exception()  # retrieved here: a caller that never asks is not warned of it
        if awaited:
            log.warning("the results of %d awaited task(s) are lost: %s", len(awaited), why)
