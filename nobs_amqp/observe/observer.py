"""Hooks for metrics, logs and traces: what the consumer, the session and the transport tell
observers, in one place.

An observer subclasses `Observer` and overrides what it needs; `Project(observers=[...])` (and
the CLI, for `--metrics-port`) adds them to every session of the project. Observers must not
raise: a hook that does is logged and the work goes on.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TypeVar

from ..message import Message

log = logging.getLogger("nobs_amqp")
_T = TypeVar("_T")


class Fate(StrEnum):
    """How a delivery ended (`TaskRun.outcome`): what observers, logs and metrics say of it.
    `outcome.decide` picks it; the values are the metrics' `outcome` label."""

    SUCCEEDED = "succeeded"
    RETRIED = "retried"
    DEAD_LETTERED = "dead_lettered"
    #: Neither a retry nor a dead letter could be placed: the broker's dead-lettering, to `W.dlx`.
    REJECTED = "rejected_to_dlx"
    #: A redelivered or re-sent copy of an attempt settled before: acked unrun.
    DUPLICATE = "duplicate"
    #: Given back to the queue unrun or unfinished (shutdown, or a broker that went away).
    REQUEUED = "requeued"


#: Consumer states (`Observer.consumer_state`): ready once subscribed, then draining after a
#: stop, stopped at the end; `reconnecting` while the connection is down (and ready again after).
READY = "ready"
RECONNECTING = "reconnecting"
DRAINING = "draining"
STOPPED = "stopped"


#: What `handling` is when nobody wraps deliveries.
_NOTHING: contextlib.AbstractContextManager[None] = contextlib.nullcontext()


@dataclass(slots=True)
class TaskRun:
    """One delivery a worker handles: what it is, and (filled in before `handling` exits) how
    it ended. `task` is whatever the message names: label metrics only with `known` ones."""

    worker: str
    task: str
    message_id: str
    attempt: int
    headers: Mapping[str, object] = field(default_factory=dict)
    #: The task is one of the project's (its name is safe as a metric label).
    known: bool = False
    #: How it ended; None while it has not (or if it never settled).
    outcome: Fate | None = None
    #: The dead-letter reason (`Reason` value) when dead-lettered.
    reason: str | None = None
    #: What the task raised, if it failed; or why it was not run (a refused message).
    error: BaseException | None = None
    #: How long the task itself ran (0 when it did not run).
    seconds: float = 0.0
    #: Whole seconds until the next attempt, when retried.
    delay: int | None = None


class PublishKind(StrEnum):
    """What a publish is: a task queued (`queue()`, a schedule's tick, a replay), a worker's
    retry copy, or a dead letter."""

    TASK = "task"
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"
    #: A cancellation (`Worker.cancel`), to the worker's `W.cancelled` stream.
    CANCEL = "cancel"


@dataclass(frozen=True, slots=True)
class Publish:
    """One publish, as `Observer.publishing` sees it."""

    kind: PublishKind
    #: The worker whose queue (or dead-letter queue) it is for.
    worker: str
    #: Where it is sent: "" (the default exchange) and the queue's name, a delay ladder's
    #: exchange and routing key, or the worker's dead-letter exchange (`W.dlx`).
    exchange: str
    routing_key: str
    #: The queue it ends in: the worker's, or its dead-letter queue (`W.dlq`).
    queue: str
    #: Whole seconds it waits in the delay ladder (0: none).
    delay: int
    message: Message


class Observer:
    """Does nothing; override the hooks you need."""

    def handling(self, run: TaskRun) -> contextlib.AbstractContextManager[None]:
        """Around the handling of one delivery, from taking it to settling it (a context manager:
        override it with a `@contextlib.contextmanager` generator)."""
        return _NOTHING

    @contextlib.contextmanager
    def publishing(self, publish: Publish) -> Iterator[Message]:
        """Around one publish and its confirm; may yield a copy of `publish.message` to send
        instead (with trace headers, say). An exception from the publish passes through."""
        yield publish.message

    def started(self, run: TaskRun) -> None:
        """The task of `run` is about to be called: it is known (`run.known`) and its payload valid."""

    def finished(self, run: TaskRun) -> None:
        """The handling of `run` is over (`run.outcome` says how it ended, None if it did not):
        called once per delivery, inside `handling`, whatever happened."""

    def holding(self, worker: str, count: int) -> None:
        """The consumer of `worker` in this process now holds `count` messages: delivered to it and
        not settled yet (waiting for a slot or being handled), at most its prefetch."""

    def rate_limited(self, worker: str, limit: str, waiting: int) -> None:
        """In this process, `waiting` deliveries of `worker` now wait for a permit of rate limit
        `limit` (each holding a concurrency slot): told when one starts and when one stops waiting."""

    def consumer_state(self, worker: str, state: str) -> None:
        """A consumer of `worker` in this process became `state` (READY, RECONNECTING, ...)."""

    def connection(self, up: bool) -> None:
        """The connection to the broker was lost (False) or is back (True)."""

    def connection_blocked(self, reason: str | None) -> None:
        """The broker blocked publishing on the connection (`reason`, e.g. "low on memory": a
        resource alarm), or unblocked it (None). Blocked is not down: consuming goes on."""

    def broker_node(self, node: str) -> None:
        """The connection reached `node` (`host:port`, no credentials): when the session opens,
        and after each reconnect (of a cluster's URLs, maybe another node than before)."""


class Observers(Observer):
    """Several observers as one: each hook calls each of them, in order; one that raises is
    logged and skipped."""

    def __init__(self, observers: Sequence[Observer] = ()) -> None:
        self.observers = list(observers)
        # Who overrides each per-message hook at all: the others cost nothing on those hot paths.
        self._handlers = [o for o in self.observers if _overrides(o, "handling")]
        self._publishers = [o for o in self.observers if _overrides(o, "publishing")]
        self._starters = [o for o in self.observers if _overrides(o, "started")]
        self._finishers = [o for o in self.observers if _overrides(o, "finished")]
        self._holders = [o for o in self.observers if _overrides(o, "holding")]

    def __bool__(self) -> bool:
        return bool(self.observers)

    @property
    def wrap_publishes(self) -> bool:
        """Whether any observer wraps publishes (else `publishing` may be skipped)."""
        return bool(self._publishers)

    def handling(self, run: TaskRun) -> contextlib.AbstractContextManager[None]:
        return self._handling(run) if self._handlers else _NOTHING

    @contextlib.contextmanager
    def _handling(self, run: TaskRun) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for observer in self._handlers:
                _enter(stack, observer, observer.handling(run))
            yield

    @contextlib.contextmanager
    def publishing(self, publish: Publish) -> Iterator[Message]:
        if not self._publishers:
            yield publish.message
            return
        with contextlib.ExitStack() as stack:
            for observer in self._publishers:
                observed = _enter(stack, observer, observer.publishing(publish))
                if isinstance(observed, Message):  # else it failed: the message as it was
                    publish = replace(publish, message=observed)
            yield publish.message

    def started(self, run: TaskRun) -> None:
        for observer in self._starters:
            _call(observer, "started", run)

    def finished(self, run: TaskRun) -> None:
        for observer in self._finishers:
            _call(observer, "finished", run)

    def holding(self, worker: str, count: int) -> None:
        for observer in self._holders:
            _call(observer, "holding", worker, count)

    def rate_limited(self, worker: str, limit: str, waiting: int) -> None:
        for observer in self.observers:
            _call(observer, "rate_limited", worker, limit, waiting)

    def consumer_state(self, worker: str, state: str) -> None:
        for observer in self.observers:
            _call(observer, "consumer_state", worker, state)

    def connection(self, up: bool) -> None:
        for observer in self.observers:
            _call(observer, "connection", up)

    def connection_blocked(self, reason: str | None) -> None:
        for observer in self.observers:
            _call(observer, "connection_blocked", reason)

    def broker_node(self, node: str) -> None:
        for observer in self.observers:
            _call(observer, "broker_node", node)


def _overrides(observer: Observer, hook: str) -> bool:
    return getattr(type(observer), hook) is not getattr(Observer, hook)


def _enter(
    stack: contextlib.ExitStack,
    observer: Observer,
    manager: contextlib.AbstractContextManager[object],
    default: object = None,
) -> object:
    try:
        return stack.enter_context(_guarded(observer, manager))
    except Exception as exc:  # noqa: BLE001 - an observer's bug never costs a task
        log.error("observer %s failed: %s: %s", type(observer).__name__, type(exc).__name__, exc)
        return None


@contextlib.contextmanager
def _guarded(observer: Observer, manager: contextlib.AbstractContextManager[_T]) -> Iterator[_T]:
    """`manager`, whose own errors on the way out are logged rather than raised."""
    value = manager.__enter__()
    try:
        yield value
    except BaseException as exc:
        try:
            manager.__exit__(type(exc), exc, exc.__traceback__)
        except Exception as error:  # noqa: BLE001
            if error is not exc:
                log.error("observer %s failed: %s: %s", type(observer).__name__, type(error).__name__, error)
        raise
    else:
        try:
            manager.__exit__(None, None, None)
        except Exception as error:  # noqa: BLE001
            log.error("observer %s failed: %s: %s", type(observer).__name__, type(error).__name__, error)


def _call(observer: Observer, hook: str, *args: object) -> None:
    try:
        getattr(observer, hook)(*args)
    except Exception as exc:  # noqa: BLE001 - an observer's bug never costs a task
        log.error("observer %s failed in %s: %s: %s", type(observer).__name__, hook, type(exc).__name__, exc)
