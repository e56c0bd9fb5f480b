"""The wire format: properties, `x-nobs-*` headers and a JSON body.

The body is the payload alone, so the management UI shows it as it is. What the
worker needs besides (attempt, when it was first enqueued, why it was
dead-lettered) travels in headers an operator can read in the same UI.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import traceback
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

CONTENT_TYPE = "application/json"

ATTEMPT = "x-nobs-attempt"
ENQUEUED_AT = "x-nobs-enqueued-at"
ETA = "x-nobs-eta"
REASON = "x-nobs-reason"
ERROR_TYPE = "x-nobs-error-type"
ERROR_MESSAGE = "x-nobs-error-message"
TRACEBACK = "x-nobs-traceback"
FAILED_AT = "x-nobs-failed-at"
WORKER_HOST = "x-nobs-worker-host"

MAX_TRACEBACK = 4000
MAX_ERROR_MESSAGE = 1000
_HOST = socket.gethostname()


@dataclass(frozen=True, slots=True)
class Message:
    """One task message, as published and as received."""

    body: bytes
    task: str
    message_id: str
    app_id: str
    timestamp: datetime
    headers: Mapping[str, object] = field(default_factory=dict)
    priority: int | None = None

    @property
    def attempt(self) -> int:
        value = self.headers.get(ATTEMPT, 1)
        return value if isinstance(value, int) and value >= 1 else 1

    @property
    def enqueued_at(self) -> datetime:
        return parse_time(self.headers.get(ENQUEUED_AT)) or self.timestamp


def now() -> datetime:
    return datetime.now(UTC)


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: object) -> datetime | None:
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def new_message(
    body: bytes,
    task: str,
    app_id: str,
    *,
    delay: float = 0.0,
    priority: int | None = None,
) -> Message:
    """A first attempt of a task, enqueued now."""
    moment = now()
    headers: dict[str, object] = {ATTEMPT: 1, ENQUEUED_AT: format_time(moment)}
    if delay > 0:
        headers[ETA] = format_time(moment + timedelta(seconds=delay))
    return Message(body, task, uuid.uuid4().hex, app_id, moment, headers, priority)


def _nobs_headers(message: Message) -> dict[str, object]:
    """The headers of ours that a copy keeps: never the broker's `x-death` history."""
    return {k: v for k, v in message.headers.items() if k.startswith("x-nobs-")}


def retry_copy(message: Message, delay: float) -> Message:
    """The next attempt of `message`, due after `delay` seconds."""
    headers = _nobs_headers(message)
    for key in (REASON, ERROR_TYPE, ERROR_MESSAGE, TRACEBACK, FAILED_AT, WORKER_HOST, ETA):
        headers.pop(key, None)
    headers[ATTEMPT] = message.attempt + 1
    if delay > 0:
        headers[ETA] = format_time(now() + timedelta(seconds=delay))
    return replace(message, headers=headers, timestamp=now())


def dead_letter_copy(message: Message, reason: str, error: BaseException | None) -> Message:
    """`message` as it goes to the dead-letter queue, with why and where it failed."""
    headers = _nobs_headers(message)
    headers.pop(ETA, None)
    headers[REASON] = reason
    headers[FAILED_AT] = format_time(now())
    headers[WORKER_HOST] = _HOST
    if error is not None:
        headers[ERROR_TYPE] = f"{type(error).__module__}.{type(error).__qualname__}"
        headers[ERROR_MESSAGE] = str(error)[:MAX_ERROR_MESSAGE]
        headers[TRACEBACK] = _task_traceback(error)[-MAX_TRACEBACK:]
    return replace(message, headers=headers)


_OWN_FRAMES = (str(Path(__file__).parent), str(Path(asyncio.__file__).parent), str(Path(concurrent.__file__).parent))


def _task_traceback(error: BaseException) -> str:
    """The traceback from the task's own code on: the worker's frames above it are noise."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None and tb.tb_frame.f_code.co_filename.startswith(_OWN_FRAMES):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(error), error, tb))


def replay_copy(message: Message) -> Message:
    """A dead-lettered message sent back to its queue: attempt count reset, failure kept out."""
    copy = retry_copy(message, 0)
    return replace(copy, headers={**copy.headers, ATTEMPT: 1, ENQUEUED_AT: format_time(copy.timestamp)})
