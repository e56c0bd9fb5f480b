"""The wire format: properties, `x-nobs-*` headers and a JSON body.

The body is the payload alone, so the management UI shows it as it is. What the
worker needs besides (attempt, when it was first enqueued, why it was
dead-lettered) travels in headers an operator can read in the same UI.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import socket
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path

CONTENT_TYPE = "application/json"

ATTEMPT = "x-nobs-attempt"
ENQUEUED_AT = "x-nobs-enqueued-at"
ETA = "x-nobs-eta"
#: When a message stops being worth running (`queue(..., expires=...)`): taken later, it is
#: dead-lettered as `expired`. Carried into retries (a retry due after it expires is not run).
EXPIRES = "x-nobs-expires"
REASON = "x-nobs-reason"
ERROR_TYPE = "x-nobs-error-type"
ERROR_MESSAGE = "x-nobs-error-message"
TRACEBACK = "x-nobs-traceback"
FAILED_AT = "x-nobs-failed-at"
WORKER_HOST = "x-nobs-worker-host"
#: Set by the transport (never trusted from a publisher beyond its own message) when some of a
#: message's properties could not be decoded: says which and why. Such a message is dead-lettered.
UNDECODABLE = "x-nobs-undecodable"
#: W3C trace context (OpenTelemetry's `tracing.Tracing` writes it): carried into retry and
#: dead-letter copies, so that every attempt of a message is in the trace that queued it.
TRACE_CONTEXT = ("traceparent", "tracestate")
_TRACE_VALUE = re.compile(r"[\x20-\x7e]{1,512}")


class Reason(StrEnum):
    """Why a message is in its worker's dead-letter queue: the `x-nobs-reason` header."""

    MAX_ATTEMPTS = "max_attempts"  # the retry policy's stop said no more
    REJECTED = "rejected"  # the task raised Reject, or an error the policy does not retry
    TIME_LIMIT = "time_limit"  # the last attempt ran past the worker's time limit
    VALIDATION_ERROR = "validation_error"  # the payload does not fit the task's annotation
    UNKNOWN_TASK = "unknown_task"  # no task of this worker by that name; nothing imported
    DECODE_ERROR = "decode_error"  # properties or body could not be decoded
    DELIVERY_LIMIT = "delivery_limit"  # handed out too often unsettled: its workers kept dying
    BAD_SIGNATURE = "bad_signature"  # unsigned or forged, with a signing key set
    RETRY_FAILED = "retry_failed"  # it failed and its retry could not be published
    WORKER_ERROR = "worker_error"  # the worker itself failed while handling it
    EXPIRED = "expired"  # taken after the time `queue(..., expires=...)` gave it
    CANCELLED = "cancelled"  # its id was cancelled with `Worker.cancel()` before it ran


MAX_TRACEBACK = 4000
MAX_ERROR_MESSAGE = 1000
_HOST = socket.gethostname()


MAX_ATTEMPT = 2**31 - 1
SIGNATURE = "x-nobs-signature"
#: Set by a producer on a message it sends again because the broker's confirm of the first send
#: never came (the connection dropped, or a nack): the broker may hold it twice. A worker that
#: settled the same attempt acks this copy without running it, as it does a redelivered one.
#: Not signed (it is added after signing) and never carried into a retry or a dead letter.
RESENT = "x-nobs-resent"
#: Set (signed) on a message whose caller awaits its result: the id the reply answers (the message's
#: own id, or the first step's id in a chain). The reply goes to the message's `reply_to` property,
#: only ever a RabbitMQ direct reply-to address. Carried into retry copies.
REPLY = "x-nobs-reply"
#: The steps that follow a task in a chain (JSON, signed): see `chains.py`. Carried into retries.
CHAIN = "x-nobs-chain"
#: The direct reply-to pseudo-queue a request names as its reply_to (the broker rewrites it to
#: a `DIRECT_REPLY_TO + "." + ...` address of the requesting channel).
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
_REPLY_ID = re.compile(r"[\x21-\x7e]{1,255}")  # printable ASCII, no spaces: any id a message may have
MAX_CHAIN_HEADER = 65536


@dataclass(frozen=True, slots=True)
class Message:
    """One task message, as published and as received.

    Headers of a received message come from whoever published it: every `x-nobs-*` value
    is read through the properties below, which validate it, never used as it is.
    """

    body: bytes
    task: str
    message_id: str
    app_id: str
    timestamp: datetime
    headers: Mapping[str, object] = field(default_factory=dict)
    priority: int | None = None
    #: Where a reply goes (a request's; see REPLY), and what it answers (a reply's).
    reply_to: str | None = None
    correlation_id: str | None = None

    @property
    def attempt(self) -> int:
        value = self.headers.get(ATTEMPT, 1)
        return min(value, MAX_ATTEMPT) if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else 1

    @property
    def enqueued_at(self) -> datetime:
        return parse_time(self.headers.get(ENQUEUED_AT)) or self.timestamp

    @property
    def expires_at(self) -> datetime | None:
        """When it stops being worth running (None: never). An unreadable value reads as
        "expired at once": a value that was set and cannot be read never makes a task run late."""
        value = self.headers.get(EXPIRES)
        if value is None:
            return None
        return parse_time(value) or datetime.min.replace(tzinfo=UTC)

    @property
    def reply(self) -> tuple[str, str] | None:
        """(address, id) when a caller awaits this message's result: its `x-nobs-reply` id, and a
        `reply_to` that is a direct reply-to address (never a queue or an exchange); else None."""
        wanted = self.headers.get(REPLY)
        address = self.reply_to
        if not isinstance(wanted, str) or not _REPLY_ID.fullmatch(wanted) or not is_reply_address(address):
            return None
        return address, wanted  # type: ignore[return-value]  # is_reply_address: a str


def awaitable_id(message_id: str) -> bool:
    """Whether a reply can name `message_id` (`x-nobs-reply`): printable ASCII without spaces."""
    return _REPLY_ID.fullmatch(message_id) is not None


def is_reply_address(address: object) -> bool:
    """Whether `address` is a direct reply-to address (of some channel of some connection)."""
    return (
        isinstance(address, str)
        and address.startswith(DIRECT_REPLY_TO + ".")
        and len(address) <= 255
        and address.isascii()
        and address.isprintable()
    )


def identity_of(message_id: str, attempt: int, enqueued_at: datetime) -> tuple[str, int, str] | None:
    """What tells one attempt of a message from any other: (id, attempt, first enqueued), the key
    of the settled-attempts memory. A replay gets a new enqueue time, so it is a new attempt 1;
    None without an id."""
    return (message_id, attempt, format_time(enqueued_at)) if message_id else None


def resent(message: Message) -> Message:
    """`message` as it is sent again after its first send was not confirmed."""
    return replace(message, headers={**message.headers, RESENT: True})


def wall_clock() -> datetime:
    """The time on this machine. Message copies take the transport's clock (`Transport.now`)."""
    return datetime.now(UTC)


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: object) -> datetime | None:
    """A time from a header, in UTC (read as UTC when it has no offset); None if unreadable, or
    if its offset takes it out of datetime's range (`9999-12-31T23:59:59-23:59`): `format_time`
    of what it returns never overflows."""
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        moment = datetime.fromisoformat(value)
        return moment.astimezone(UTC) if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        return None


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(value: object, limit: int = 300) -> str:
    """`value` as one log-safe line: control characters escaped (no forged log lines), capped."""
    text = value if isinstance(value, str) else _text(value, limit + 1)
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable():  # none of _UNPRINTABLE's characters (they are all unprintable)
        return text
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


def new_message(
    body: bytes,
    task: str,
    app_id: str,
    *,
    now: datetime,
    delay: int = 0,
    priority: int | None = None,
    message_id: str | None = None,
    expires: float | None = None,
) -> Message:
    """A first attempt of a task, enqueued `now`, due `delay` whole seconds later; not run if
    taken more than `expires` seconds after `now`. `message_id`: the caller's (else a random one)."""
    headers: dict[str, object] = {ATTEMPT: 1, ENQUEUED_AT: format_time(now)}
    if delay > 0:
        headers[ETA] = format_time(now + timedelta(seconds=delay))
    if expires is not None:
        headers[EXPIRES] = format_time(now + timedelta(seconds=expires))
    return Message(body, task, message_id or new_id(), app_id, now, headers, priority)


def new_id() -> str:
    """A random message id, as `uuid.uuid4().hex` makes it (version 4, RFC 4122 variant), in a
    seventh of the time (no UUID object)."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40
    raw[8] = raw[8] & 0x3F | 0x80
    return raw.hex()


def _trusted_headers(message: Message) -> dict[str, object]:
    """The headers of ours a copy carries, rebuilt from validated values: never a publisher's
    other `x-nobs-*` values, nor the broker's `x-death` history. Trace context, if it looks like it."""
    headers: dict[str, object] = {ATTEMPT: message.attempt, ENQUEUED_AT: format_time(message.enqueued_at)}
    expires = message.expires_at
    if expires is not None:
        headers[EXPIRES] = format_time(expires)
    for name in TRACE_CONTEXT:
        value = message.headers.get(name)
        if isinstance(value, str) and _TRACE_VALUE.fullmatch(value):
            headers[name] = value
    return headers


def _follow_ups(message: Message, headers: dict[str, object]) -> None:
    """Carry the reply id and the chain (validated as strings; what they say is read later)."""
    reply = message.headers.get(REPLY)
    if isinstance(reply, str) and _REPLY_ID.fullmatch(reply):
        headers[REPLY] = reply
    chain = message.headers.get(CHAIN)
    if isinstance(chain, str) and len(chain) <= MAX_CHAIN_HEADER:
        headers[CHAIN] = chain


def retry_copy(message: Message, delay: int, *, now: datetime) -> Message:
    """The next attempt of `message`, sent `now`, due `delay` whole seconds later."""
    headers = _trusted_headers(message)
    _follow_ups(message, headers)
    headers[ATTEMPT] = min(message.attempt + 1, MAX_ATTEMPT)
    if delay > 0:
        headers[ETA] = format_time(now + timedelta(seconds=delay))
    return _clean(replace(message, headers=headers, timestamp=now))


def dead_letter_copy(message: Message, reason: Reason, error: BaseException | str | None, *, now: datetime) -> Message:
    """`message` as it goes to the dead-letter queue `now`, with why and where it failed."""
    headers = _trusted_headers(message)
    _follow_ups(message, headers)  # what the caller awaited, and the steps that did not run
    headers[REASON] = reason.value
    headers[FAILED_AT] = format_time(now)
    headers[WORKER_HOST] = _HOST
    if isinstance(error, BaseException):
        headers[ERROR_TYPE] = f"{type(error).__module__}.{type(error).__qualname__}"
        headers[ERROR_MESSAGE] = _text(error, MAX_ERROR_MESSAGE)
        headers[TRACEBACK] = _task_traceback(error)[-MAX_TRACEBACK:]
    elif error is not None:
        headers[ERROR_MESSAGE] = _text(error, MAX_ERROR_MESSAGE)
    return _clean(replace(message, headers=headers))


def _text(value: object, limit: int) -> str:
    try:
        text = str(value)
    except Exception as exc:  # noqa: BLE001 - an exception whose __str__ raises
        text = f"<unprintable {type(value).__name__}: {type(exc).__name__}>"
    return text[:limit].encode("utf-8", "backslashreplace").decode("utf-8")


def _short(value: str) -> str:
    """`value` as an AMQP short string can carry it: UTF-8, at most 255 bytes."""
    if len(value) <= 255 and value.isascii():  # as it is (the usual case)
        return value
    return value.encode("utf-8", "backslashreplace")[:255].decode("utf-8", "ignore")


def _clean(message: Message) -> Message:
    """A copy safe to publish whatever the original carried: properties a client can encode."""
    task, message_id, app_id = _short(message.task), _short(message.message_id), _short(message.app_id)
    priority = message.priority if message.priority is not None and 0 <= message.priority <= 255 else None
    reply_to = message.reply_to if is_reply_address(message.reply_to) else None
    correlation_id = _short(message.correlation_id) if message.correlation_id is not None else None
    if (task, message_id, app_id, priority, reply_to, correlation_id) == (
        message.task,
        message.message_id,
        message.app_id,
        message.priority,
        message.reply_to,
        message.correlation_id,
    ):
        return message
    return replace(
        message,
        task=task,
        message_id=message_id,
        app_id=app_id,
        priority=priority,
        reply_to=reply_to,
        correlation_id=correlation_id,
    )


_OWN_FRAMES = (str(Path(__file__).parent), str(Path(asyncio.__file__).parent), str(Path(concurrent.__file__).parent))


def _task_traceback(error: BaseException) -> str:
    """The traceback from the task's own code on: the worker's frames above it are noise."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None and tb.tb_frame.f_code.co_filename.startswith(_OWN_FRAMES):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(error), error, tb))


def replay_copy(message: Message, *, now: datetime) -> Message:
    """A dead-lettered message sent back to its queue `now`: attempt count reset, failure kept out."""
    headers = {ATTEMPT: 1, ENQUEUED_AT: format_time(now)}
    return _clean(replace(message, headers=headers, timestamp=now, reply_to=None, correlation_id=None))
