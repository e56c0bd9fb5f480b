"""The retry policy, a task's own options (`@task(...)`), and what a task raises to steer its
own outcome (`Retry`, `Reject`).

The policy speaks tenacity's vocabulary: `stop`, `wait` and `retry` are
tenacity strategies (`stop_after_attempt(5)`, `wait_exponential_jitter(...)`,
`retry_if_exception_type(...)`, combined with `|`, `&` and `+`). They are called
with a real `tenacity.RetryCallState` describing the attempt that just failed; `outcome.decide`
is where that happens.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, TypeVar

import tenacity

from .errors import NobsAmqpError, TaskDefinitionError
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


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """What a task sets for itself over its worker's: retry strategies and time limit (None: the worker's)."""

    stop: StopStrategy | None = None
    wait: WaitStrategy | None = None
    retry: RetryStrategy | None = None
    time_limit: float | None = None

    def policy(self, worker: RetryPolicy) -> RetryPolicy:
        """The worker's policy with this task's strategies in place of its own."""
        if self.stop is None and self.wait is None and self.retry is None:
            return worker
        return replace(
            worker,
            stop=self.stop or worker.stop,
            wait=self.wait or worker.wait,
            retry=self.retry or worker.retry,
        )

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.stop, self.wait, self.retry, self.time_limit))

    def describe(self) -> str:
        """`stop=stop_after_attempt(max_attempt_number=8), time_limit=30s`: for status and logs."""
        parts = [f"{name}={describe_strategy(value)}" for name, value in self._strategies() if value is not None]
        if self.time_limit is not None:
            parts.append(f"time_limit={self.time_limit:g}s")
        return ", ".join(parts)

    def _strategies(self) -> list[tuple[str, object]]:
        return [("stop", self.stop), ("wait", self.wait), ("retry", self.retry)]


#: Where `@task(...)` keeps a function's options: on the function itself, so a worker and a
#: producer read the same, and `queue()` takes the function as it is.
OPTIONS_ATTRIBUTE = "__nobs_amqp_task_options__"
_F = TypeVar("_F", bound=Callable[..., Any])


def task(
    *,
    stop: StopStrategy | None = None,
    wait: WaitStrategy | None = None,
    retry: RetryStrategy | None = None,
    time_limit: float | timedelta | None = None,
) -> Callable[[_F], _F]:
    """Give a task its own retry strategies and time limit, over its worker's:

        @task(stop=stop_after_attempt(8), wait=wait_exponential(max=300), time_limit=30)
        async def call_webhook(request: Webhook) -> None: ...

    The function is returned as it is (its name, signature and `queue()` unchanged)."""
    limit = checked_seconds(time_limit, "@task(time_limit=...)", positive=True) if time_limit is not None else None
    options = TaskOptions(stop, wait, retry, limit)

    def register(fn: _F) -> _F:
        if not inspect.isfunction(fn):
            raise TaskDefinitionError(
                fn, f"@task(...) takes a plain function defined with def, not a {type(fn).__name__}"
            )
        setattr(fn, OPTIONS_ATTRIBUTE, options)
        return fn

    return register


def options_of(fn: object) -> TaskOptions:
    """The options `@task(...)` gave `fn` (none: all None)."""
    options = getattr(fn, OPTIONS_ATTRIBUTE, None)
    return options if isinstance(options, TaskOptions) else TaskOptions()


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
