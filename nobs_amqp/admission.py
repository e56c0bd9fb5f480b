"""Whether a delivery may run, before anything of it is trusted: its signature, headers the
transport could not decode, the broker's delivery count against the queue's limit, a task of
this project, a payload that validates. A refusal says why (the consumer dead-letters it);
an admitted delivery comes with its task and decoded payload."""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from . import message as wire
from .errors import (
    BadSignatureError,
    DeliveryLimitExceeded,
    ForeignTaskError,
    TaskCancelledError,
    TaskDefinitionError,
    TaskExpiredError,
    UndecodableMessageError,
    UnknownTaskError,
)
from .message import printable
from .observe.observer import TaskRun
from .outcome import Refused
from .session import Session
from .tasks import TaskSpec, TaskTable
from .transports.base import Delivery
from .worker import Worker

#: Set by quorum queues on a redelivery: how often the message came back unsettled.
#: RabbitMQ 4.3 counts only explicit failures there and every earlier hand-out in
#: `x-acquired-count`, so the larger of the two says how often a worker got it before.
DELIVERY_COUNTS = ("x-delivery-count", "x-acquired-count")


@dataclass(frozen=True, slots=True)
class Admitted:
    spec: TaskSpec
    payload: Any
    #: How often the broker handed the message out before (quorum queues).
    returned: int


class Admission:
    """The checks of one worker's deliveries, in the order nothing untrusted is read first."""

    def __init__(
        self, session: Session, worker: Worker, tasks: TaskTable, cancelled: Container[str] | None = None
    ) -> None:
        self.session = session
        self.worker = worker
        self._tasks = tasks
        #: Whether a message id was cancelled (`Worker.cancel`); None: the worker takes no cancellations.
        self._cancelled = cancelled
        self._quorum = worker.queue_options.queue_type == "quorum"

    def check(self, delivery: Delivery, run: TaskRun) -> Refused | Admitted:
        """Refused (why), or the task and payload; `run.known` once the task is the project's."""
        message = delivery.message
        signer = self.session.signer  # before anything else: nothing of an unsigned message is trusted
        if signer is not None and (problem := signer.problem(message, self.worker.name)) is not None:
            return Refused(BadSignatureError(problem))
        undecodable = message.headers.get(wire.UNDECODABLE)
        if undecodable is not None:
            return Refused(UndecodableMessageError(printable(undecodable, 1000)))
        limit = self.worker.queue_options.delivery_limit
        returned = self._returned(delivery)
        if limit is not None and returned >= limit:
            return Refused(
                DeliveryLimitExceeded(
                    f"handed to a worker {returned} times without being settled (the worker was killed, "
                    f"ran out of memory, crashed, or was stopped before it ran it); not running it again"
                )
            )
        if (stale := self._stale(message)) is not None:
            return Refused(stale)
        try:
            spec = self._tasks.get(message.task)
            run.known = True
            payload = spec.decode(message.body)
        except (UnknownTaskError, TaskDefinitionError) as exc:
            return Refused(self._unknown(message, exc))
        except (orjson.JSONDecodeError, RecursionError) as exc:
            undecodable_body = UndecodableMessageError(f"the body is not JSON a task can take: {printable(exc)}")
            undecodable_body.__cause__ = exc
            return Refused(undecodable_body)
        except ValidationError as exc:
            return Refused(exc)
        return Admitted(spec, payload, returned)

    def _stale(self, message: wire.Message) -> TaskCancelledError | TaskExpiredError | None:
        """Why a message is no longer to be run: its id was cancelled, or it expired."""
        if self._cancelled is not None and message.message_id in self._cancelled:
            return TaskCancelledError(f"message {printable(message.message_id, 200)!r} was cancelled; not running it")
        expires = message.expires_at
        if expires is not None and (now := self.session.now()) >= expires:
            late = (now - expires).total_seconds()
            return TaskExpiredError(
                f"it expired at {wire.format_time(expires)}, {late:.0f} s before a worker took it; not running it"
            )
        return None

    def _unknown(
        self, message: wire.Message, error: UnknownTaskError | TaskDefinitionError
    ) -> UnknownTaskError | TaskDefinitionError:
        """Why a task is unknown here; a message another project sent says so: two projects that
        share a vhost and a worker name consume each other's messages."""
        sender = message.app_id
        if not sender or sender == self.session.project:
            return error
        foreign = ForeignTaskError(
            f"a message from project {printable(sender, 100)!r} reached worker {self.worker.name!r} of project "
            f"{self.session.project!r}: each project needs its own vhost or its own worker names ({error})"
        )
        foreign.__cause__ = error
        return foreign

    def _returned(self, delivery: Delivery) -> int:
        """How often the broker handed this message out before. Only a quorum queue counts that,
        and only on a redelivery: a header a publisher wrote is not the broker's count."""
        if not (self._quorum and delivery.redelivered):
            return 0
        headers = delivery.message.headers
        return max((n for h in DELIVERY_COUNTS if type(n := headers.get(h)) is int), default=0)
