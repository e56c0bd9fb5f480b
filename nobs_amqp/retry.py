"""The retry policy (a worker's, which a task's own `@task(...)` options in `tasks.py` may
override), and what a task raises to steer its own outcome (`Retry`, `Reject`).

The policy speaks tenacity's vocabulary: `stop`, `wait` and `retry` are
tenacity strategies (`stop_after_attempt(5)`, `wait_exponential_jitter(...)`,
`retry_if_exception_type(...)`, combined with `|`, `&` and `+`). They are called
with a real `tenacity.RetryCallState` describing the attempt that just failed; `outcome.decide`
is where that happens.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import tenacity

from .errors import NobsAmqpError
from .ladder import checked_seconds

StopStrategy = Callable[[tenacity.RetryCallState], bool]
WaitStrategy = Callable[[tenacity.RetryCallState], float]
RetryStrategy = Callable[[tenacity.RetryCallState], bool]


class Retry(NobsAmqpError):  # noqa: N818 - a signal a task raises, named as users say it
    """Raised by a task: run it again after `delay` (seconds or timedelta; None: the policy's wait).
    `reason` says why; a dead letter shows it when the attempts run out."""

    def __init__(self, delay: float | timedelta | None = None, reason: str | None = None) -> None:
        self.delay = checked_seconds(delay, "Retry(delay=...)") if delay is not None else None
        self.reason = reason
        said = "retry requested" + (f": {reason}" if reason else "")
        super().__init__(f"{said} (delay {self.delay} s)" if self.delay is not None else said)


class Reject(NobsAmqpError):  # noqa: N818
    """Raised by a task: dead-letter the message now with `reason`, no retry."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


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


def describe_strategy(strategy: object) -> str:
    """A tenacity strategy as a person reads it: `stop_after_attempt(max_attempt_number=8)`."""
    name = getattr(strategy, "__qualname__", None) or type(strategy).__name__
    if inspect.isroutine(strategy) or isinstance(strategy, type):
        return name
    fields = getattr(strategy, "__dict__", {})
    shown = ", ".join(
        f"{key}={_shown(value)}" for key, value in fields.items() if not key.startswith("_") and key != "predicate"
    )
    return f"{name}({shown})"


def _shown(value: object) -> str:
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_shown(item) for item in value) + "]"
    if isinstance(value, int | float | str | bool | None | timedelta):
        return repr(value)
    return describe_strategy(value)
