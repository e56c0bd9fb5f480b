"""A delivery's fate: what happened to it in, one outcome out. Decided here and nowhere else.

The consumer reports what happened (`Succeeded`, `Refused` before the task ran, `Raised` by
the task, `Duplicate` of an attempt settled before, `GivenBack` when the worker stops before
it ran or finished, `NotPlaced` when a retry or dead-letter copy could not be published,
`WorkerFailed` when the worker itself failed) and `decide` answers with one outcome: ack,
ack unrun, retry after whole seconds, dead-letter with a `Reason`, reject to the broker's
dead-lettering, or requeue. It is a pure function of its arguments: no I/O, and the clock is
passed in (the transport's, virtual on `memory://`). `fate` says what an outcome is to
observers, logs and metrics (one `Fate`), and `record` writes it into the delivery's `TaskRun`.
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
    BrokerUnavailableError,
    DeliveryLimitExceeded,
    RetryNotPlacedError,
    TaskCancelledError,
    TaskDefinitionError,
    TaskExpiredError,
    TimeLimitExceeded,
    UndecodableMessageError,
    UnknownTaskError,
)
from .ladder import MAX_DELAY_SECONDS, delay_seconds
from .message import Reason, printable
from .observe.observer import Fate, TaskRun
from .retry import Reject, Retry, RetryPolicy

# -- what happened ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Succeeded:
    """The task ran and returned `value`."""

    value: object = None


@dataclass(frozen=True, slots=True)
class Refused:
    """The task was not run: the message is undecodable, unsigned, over its delivery limit, names
    no task of this worker, or its payload does not validate. `error` says which."""

    error: (
        UndecodableMessageError
        | BadSignatureError
        | DeliveryLimitExceeded
        | TaskCancelledError
        | TaskExpiredError
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
class Duplicate:
    """A copy (redelivered, or sent again) of an attempt this worker settled before."""


@dataclass(frozen=True, slots=True)
class GivenBack:
    """The worker stops before the task ran or finished (shutdown, past its grace period)."""


@dataclass(frozen=True, slots=True)
class NotPlaced:
    """The copy `placing` needs (a retry, or a dead letter) could not be published, even after
    declaring again: `error` says why."""

    error: BaseException
    placing: RetryLater | DeadLetter


@dataclass(frozen=True, slots=True)
class WorkerFailed:
    """The worker failed while handling the message (a bug in the worker, not the task, or a
    broker that went away: `BrokerUnavailableError`)."""

    error: BaseException


Happened = Succeeded | Refused | Raised | Duplicate | GivenBack | NotPlaced | WorkerFailed

# -- what to do ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ack:
    """Done: the task succeeded (`ran`), or this is a duplicate that must not run again."""

    ran: bool = True


@dataclass(frozen=True, slots=True)
class RetryLater:
    """Publish a retry copy through the delay ladder, then ack."""

    delay: int  # whole seconds, what the delay ladder holds it for
    error: BaseException


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Publish a dead-letter copy (with the reason and error in its headers), then ack."""

    reason: Reason
    error: BaseException | None


@dataclass(frozen=True, slots=True)
class RejectToDlx:
    """No copy could be published: reject it, and the broker dead-letters it through `W.dlx`."""

    reason: Reason
    error: BaseException | None


@dataclass(frozen=True, slots=True)
class Requeue:
    """Give it back to the queue: this worker stops, or the broker went away."""


Outcome = Ack | RetryLater | DeadLetter | RejectToDlx | Requeue

_REFUSALS: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], Reason], ...] = (
    (UndecodableMessageError, Reason.DECODE_ERROR),
    (BadSignatureError, Reason.BAD_SIGNATURE),
    (DeliveryLimitExceeded, Reason.DELIVERY_LIMIT),
    (TaskCancelledError, Reason.CANCELLED),
    (TaskExpiredError, Reason.EXPIRED),
    ((UnknownTaskError, TaskDefinitionError), Reason.UNKNOWN_TASK),
    (ValidationError, Reason.VALIDATION_ERROR),
)


def decide(happened: Happened, policy: RetryPolicy, now: datetime) -> Outcome:
    """The one outcome of what happened to a delivery. `now` is the broker side's clock."""
    match happened:
        case Succeeded():
            return Ack()
        case Duplicate():
            return Ack(ran=False)
        case GivenBack():
            return Requeue()
        case Refused(error):
            return DeadLetter(_refusal(error), error)
        case NotPlaced(error, RetryLater() as retry):
            failed = RetryNotPlacedError(
                f"{printable(retry.error, 500)}; and its retry could not be published: {error}"
            )
            failed.__cause__ = retry.error
            return DeadLetter(Reason.RETRY_FAILED, failed)
        case NotPlaced(_, DeadLetter(reason, error)):
            return RejectToDlx(reason, error)
        case WorkerFailed(BrokerUnavailableError()):
            return Requeue()  # the connection is gone: the broker gives the message back anyway
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


def fate(outcome: Outcome) -> Fate:
    """What `outcome` is to observers, logs and metrics."""
    match outcome:
        case Ack(ran):
            return Fate.SUCCEEDED if ran else Fate.DUPLICATE
        case RetryLater():
            return Fate.RETRIED
        case DeadLetter():
            return Fate.DEAD_LETTERED
        case RejectToDlx():
            return Fate.REJECTED
        case Requeue():
            return Fate.REQUEUED
    raise AssertionError(f"unexpected {outcome!r}")  # pragma: no cover - the match is exhaustive


def record(run: TaskRun, outcome: Outcome) -> None:
    """Write how the delivery of `run` ended into it, for observers."""
    run.outcome = fate(outcome)
    if isinstance(outcome, RetryLater):
        run.delay = outcome.delay
    elif isinstance(outcome, DeadLetter | RejectToDlx):
        run.reason = outcome.reason.value
        run.error = run.error or outcome.error  # a refusal: why it did not run
