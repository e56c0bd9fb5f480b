"""The copies a worker publishes in place of a delivery: its retry and its dead letter.

Each is confirmed by the broker before the delivery is acked (the consumer does that), so
a crash between the two at worst leaves both, never neither.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from . import message as wire
from .errors import BrokerUnavailableError, NobsAmqpError
from .message import printable
from .observe.observer import PublishKind
from .outcome import DeadLetter, RetryLater
from .session import Session
from .transports.base import until_confirmed
from .worker import Worker

log = logging.getLogger("nobs_amqp")

_Publish = Callable[[], Awaitable[None]]


class Copies:
    """Places the retry or dead-letter copy of one worker's deliveries."""

    def __init__(self, session: Session, worker: Worker) -> None:
        self.session = session
        self.worker = worker

    async def place(self, message: wire.Message, outcome: RetryLater | DeadLetter) -> NobsAmqpError | None:
        """Publish the copy `outcome` needs (confirmed); why it cannot be placed, else None
        (what then becomes of the delivery is `outcome.decide`'s, of `NotPlaced`)."""
        if isinstance(outcome, RetryLater):
            copy = wire.retry_copy(message, outcome.delay, now=self.session.now())
            error = await self._publish_once_more(
                lambda: self.session.send(self.worker, copy, outcome.delay, PublishKind.RETRY)
            )
            if error is not None:
                log.error(
                    "task %s id %s attempt %d: its retry cannot be placed (%s); dead-lettering it",
                    message.task,
                    printable(message.message_id),
                    message.attempt,
                    printable(error),
                )
            return error  # placed: logged with the delivery's outcome (logs.TaskLog)
        dead = wire.dead_letter_copy(message, outcome.reason, outcome.error, now=self.session.now())
        error = await self._publish_once_more(lambda: self.session.dead_letter(self.worker, dead))
        if error is not None:
            log.error(
                "task %s id %s: its dead letter cannot be placed (%s); rejecting it to %s.dlx",
                printable(message.task),
                printable(message.message_id),
                printable(error),
                self.worker.name,
            )
        return error

    async def _publish_once_more(self, publish: _Publish) -> NobsAmqpError | None:
        """Publish; if the broker says something is missing (404, returned) or refused it, declare the
        topology again and try once more. The error that remains, or None. An unreachable broker
        raises: the connection is gone, and the broker gives the message back itself."""
        error: NobsAmqpError | None = None
        for attempt in range(2):
            if attempt:
                log.warning("worker %s: %s; declaring the topology again", self.worker.name, printable(error))
                self.session.forget_declared(self.worker)
            try:
                with until_confirmed():  # a copy that may be in the queue is never given up (no fork)
                    await publish()
                return None
            except BrokerUnavailableError:
                raise
            except NobsAmqpError as exc:
                error = exc
        return error
