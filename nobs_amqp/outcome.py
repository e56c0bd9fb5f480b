"""A delivery's fate: what happened to it in, one outcome out. Decided here and nowhere else.

The consumer reports what happened (`Succeeded`, `Refused` before the task ran, `Raised` by
the task, `NotPlaced` when a retry copy could not be published, `WorkerFailed` when the worker
itself failed) and `decide` answers with one outcome: ack, retry after whole seconds, or
dead-letter with a `Reason`. It is a pure function of its arguments: no I/O, and the clock is
passed in (the transport's, virtual on `memory://`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import tenacity
from pydantic import ValidationError

from .errors import (
    BadSignatureError,
    DeliveryLimitExceeded,
    TaskDefinitionError,
    TimeLimitExceeded,
    UndecodableMessageError,
    UnknownTaskError,
)
from .ladder import MAX_DELAY_SECONDS, delay_seconds
from .message import Reason
from .retry import Reject, Retry, RetryPolicy

# -- what happened ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Succeeded:
    """The task ran and returned."""


@dataclass(frozen=True, slots=True)
class Refused:
    """The task was not run: the message is undecodable, unsigned, over its delivery limit, names
    no task of this worker, or its payload does not validate. `error` says which."""

    error: (
        UndecodableMessageError
        | BadSignatureError
        | DeliveryLimitExceeded
        | UnknownTaskError
        | TaskDefinitionError
        | ValidationError
    )


@dataclass(frozen=True, slots=True)
class Raised:
    """The task ran and raised `error` (`Retry`, `Reject`, `TimeLimitExceeded` or anything else)."""

    error: BaseException
    attempt: int
    enqueued_at: datetime
    fn: Any = None
    #: The task's own policy (`@task(...)`), when it overrides its worker's.
    policy: RetryPolicy | None = None


@dataclass(frozen=True, slots=True)
class NotPlaced:
    """The task failed and its retry copy could not be published, even after declaring again."""

    error: BaseException


@dataclass(frozen=True, slots=True)
class WorkerFailed:
    """The worker failed while handling the message (a bug in the worker, not the task)."""

    error: BaseException


Happened = Succeeded | Refused | Raised | NotPlaced | WorkerFailed

# -- what to do ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ack:
    pass


@dataclass(frozen=True, slots=True)
class RetryLater:
    delay: int  # whole seconds, what the delay ladder holds it for
    error: BaseException


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: Reason
    error: BaseException | None


Outcome = Ack | RetryLater | DeadLetter

_REFUSALS: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], Reason], ...] = (
    (UndecodableMessageError, Reason.DECODE_ERROR),
    (BadSignatureError, Reason.BAD_SIGNATURE),
    (DeliveryLimitExceeded, Reason.DELIVERY_LIMIT),
    ((UnknownTaskError, TaskDefinitionError), Reason.UNKNOWN_TASK),
    (ValidationError, Reason.VALIDATION_ERROR),
)


def decide(happened: Happened, policy: RetryPolicy, now: datetime) -> Outcome:
    """The one outcome of what happened to a delivery. `now` is the broker side's clock."""
    match happened:
        case Succeeded():
            return Ack()
        case Refused(error):
            return DeadLetter(_refusal(error), error)
        case NotPlaced(error):
            return DeadLetter(Reason.RETRY_FAILED, error)
        case WorkerFailed(error):
            return DeadLetter(Reason.WORKER_ERROR, error)
        case Raised():
            return _after_failure(happened, happened.policy or policy, now)
    raise AssertionError(f"unexpected {happened!r}")  # pragma: no cover - the match is exhaustive


def _refusal(error: BaseException) -> Reason:
    for kinds, reason in _REFUSALS:
        if isinstance(error, kinds):
            return reason
    raise AssertionError(f"no reason for refusal {type(error).__name__}")  # pragma: no cover - typed away


def _after_failure(raised: Raised, policy: RetryPolicy, now: datetime) -> Outcome:
    """Attempt number `raised.attempt` (1-based) raised: retry it, or dead-letter it."""
    error = raised.error
    if isinstance(error, Reject):
        return DeadLetter(Reason.REJECTED, error)
    state = _state(raised, now)
    if not isinstance(error, Retry) and not policy.retry(state):
        return DeadLetter(Reason.REJECTED, error)
    if policy.stop(state):
        return DeadLetter(Reason.TIME_LIMIT if isinstance(error, TimeLimitExceeded) else Reason.MAX_ATTEMPTS, error)
    wanted = error.delay if isinstance(error, Retry) and error.delay is not None else float(policy.wait(state))
    # Rounded once, here: the ladder holds messages for whole seconds, never less than asked.
    return RetryLater(delay_seconds(min(max(0.0, wanted), MAX_DELAY_SECONDS)), error)


_RETRYING = tenacity.Retrying()


def _state(raised: Raised, now: datetime) -> tenacity.RetryCallState:
    """What tenacity's strategies read: the attempt number, the error, and the time since the
    task was first enqueued, on the broker side's clock."""
    state = tenacity.RetryCallState(_RETRYING, raised.fn, (), {})
    clock = time.monotonic()
    state.start_time = clock - max(0.0, (now - raised.enqueued_at).total_seconds())
    state.attempt_number = raised.attempt
    outcome = tenacity.Future(raised.attempt)
    outcome.set_exception(raised.error)
    state.outcome = outcome
    state.outcome_timestamp = clock
    return state
