"""What a running task can know about itself: `current_task()`.

    from nobs_amqp import current_task

    async def send_email(request: SendEmail) -> None:
        task = current_task()
        if already_sent(task.message_id):      # idempotency keyed on the message id
            return
        await task.state["smtp"].send(...)     # opened once per worker process by its lifespan

It works in async tasks and in sync tasks (in their thread), on RabbitMQ and on memory://
alike; outside a running task it raises `NoTaskContextError`.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .errors import NoTaskContextError


@dataclass(frozen=True, slots=True)
class TaskContext:
    """The message a task is running for, and its worker's shared state."""

    message_id: str
    #: The task reference, `module:function`.
    task: str
    #: The name of the worker (its queue) that runs it.
    worker: str
    #: This attempt's number, 1 for the first run; a retry is attempt 2, and so on.
    attempt: int
    #: When the first attempt was enqueued (a retry keeps it).
    enqueued_at: datetime
    #: How often the broker handed this message out before without it being settled (its
    #: worker died or stopped): 0 normally. Quorum queues count it; classic queues say 0.
    delivery_count: int
    #: What the worker's (or the project's) lifespan yielded in this process; None without one.
    state: Any


_CURRENT: ContextVar[TaskContext | None] = ContextVar("nobs_amqp_current_task", default=None)


def current_task() -> TaskContext:
    """The running task's context; NoTaskContextError outside a task."""
    context = _CURRENT.get()
    if context is None:
        raise NoTaskContextError(
            "current_task() is only available inside a task a worker runs; outside one (in an "
            "endpoint, a test calling the function directly), pass what the code needs as arguments"
        )
    return context


class running:  # noqa: N801 - used as a function: `with running(context):`
    """Make `context` the current task's for the block (and for the threads it starts with
    `contextvars.copy_context()`)."""

    __slots__ = ("_context", "_token")

    def __init__(self, context: TaskContext) -> None:
        self._context = context

    def __enter__(self) -> None:
        self._token = _CURRENT.set(self._context)

    def __exit__(self, *exc: object) -> None:
        _CURRENT.reset(self._token)
