"""What happens after a task ran: ack, retry later, or dead-letter. Decided here only.

The retry policy speaks tenacity's vocabulary: `stop`, `wait` and `retry` are
tenacity strategies (`stop_after_attempt(5)`, `wait_exponential_jitter(...)`,
`retry_if_exception_type(...)`, combined with `|`, `&` and `+`). They are called
with a real `tenacity.RetryCallState` describing the attempt that just failed.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import tenacity

from .delay import MAX_DELAY_SECONDS, delay_seconds
from .errors import ConfigurationError
from .message import now

StopStrategy = Callable[[tenacity.RetryCallState], bool]
WaitStrategy = Callable[[tenacity.RetryCallState], float]
RetryStrategy = Callable[[tenacity.RetryCallState], bool]


class Retry(Exception):  # noqa: N818 - a signal a task raises, named as users say it
    """Raised by a task: run it again after `delay` (seconds or timedelta; None: the policy's wait)."""

    def __init__(self, delay: float | timedelta | None = None) -> None:
        self.delay = seconds(delay, "Retry(delay=...)") if delay is not None else None
        super().__init__(f"retry requested (delay {self.delay} s)" if self.delay is not None else "retry requested")


class Reject(Exception):  # noqa: N818
    """Raised by a task: dead-letter the message now with `reason`, no retry."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class TimeLimitExceeded(Exception):  # noqa: N818
    """A task ran longer than its worker's time limit."""


class DeliveryLimitExceeded(Exception):  # noqa: N818
    """A message came back more often than its queue's delivery limit: its worker kept dying."""


def seconds(value: float | timedelta, what: str = "delay", *, positive: bool = False) -> float:
    """`value` (a number of seconds or a timedelta) in seconds. ConfigurationError naming the allowed
    range for anything else: a string, a bool, nan, infinity, a negative value (zero too when
    `positive`), or more than the delay ladder holds (MAX_DELAY_SECONDS, about 8.5 years)."""
    span = "more than 0 and at most" if positive else "0 to"
    allowed = f"{what} must be {span} {MAX_DELAY_SECONDS} seconds (about 8.5 years), as a number or a timedelta"
    shown = repr(value)[:60]
    if isinstance(value, timedelta):
        result = value.total_seconds()
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            result = float(value)
        except OverflowError:
            raise ConfigurationError(f"{allowed} (got {shown})") from None
    else:
        raise ConfigurationError(f"{allowed} (got {type(value).__name__} {shown})")
    if not (result > 0 if positive else result >= 0) or not result <= MAX_DELAY_SECONDS:  # nan fails both
        raise ConfigurationError(f"{allowed} (got {shown})")
    return result


def default_stop() -> StopStrategy:
    return tenacity.stop_after_attempt(5)


def default_wait() -> WaitStrategy:
    return tenacity.wait_exponential_jitter(initial=1, max=60, jitter=1)


def default_retry() -> RetryStrategy:
    return tenacity.retry_if_exception_type(Exception)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    stop: StopStrategy = field(default_factory=default_stop)
    wait: WaitStrategy = field(default_factory=default_wait)
    retry: RetryStrategy = field(default_factory=default_retry)


@dataclass(frozen=True, slots=True)
class Ack:
    pass


@dataclass(frozen=True, slots=True)
class RetryLater:
    delay: float
    error: BaseException


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str
    error: BaseException | None


Outcome = Ack | RetryLater | DeadLetter

_RETRYING = tenacity.Retrying()


def decide(policy: RetryPolicy, error: BaseException, attempt: int, enqueued_at: datetime, fn: Any = None) -> Outcome:
    """The outcome of attempt number `attempt` (1-based) that raised `error`."""
    if isinstance(error, Reject):
        return DeadLetter("rejected", error)
    state = _state(error, attempt, enqueued_at, fn)
    if not isinstance(error, Retry) and not policy.retry(state):
        return DeadLetter("rejected", error)
    if policy.stop(state):
        return DeadLetter("time_limit" if isinstance(error, TimeLimitExceeded) else "max_attempts", error)
    wanted = error.delay if isinstance(error, Retry) and error.delay is not None else float(policy.wait(state))
    # The delay ladder holds messages for whole seconds, never less than asked.
    return RetryLater(float(delay_seconds(min(max(0.0, wanted), MAX_DELAY_SECONDS))), error)


def _state(error: BaseException, attempt: int, enqueued_at: datetime, fn: Any) -> tenacity.RetryCallState:
    state = tenacity.RetryCallState(_RETRYING, fn, (), {})
    clock = time.monotonic()
    state.start_time = clock - max(0.0, (now() - enqueued_at).total_seconds())
    state.attempt_number = attempt
    outcome = tenacity.Future(attempt)
    outcome.set_exception(error)
    state.outcome = outcome
    state.outcome_timestamp = clock
    return state
