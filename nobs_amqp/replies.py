"""What a worker sends once a delivery's fate is final, before it acks it: the next step of its
chain, or its result to a caller that awaits it (`results.py` says what a reply holds).

Nothing here raises: a reply that cannot be sent, or a next step that cannot be queued, is
logged (the caller, if any, is told). The next step is placed as a retry copy is, confirmed
before the ack; only a broker that is unreachable changes the delivery's fate: it goes back to
the queue, runs again, and queues the next step then (at least once, as everything). A retry
sends nothing: the caller keeps waiting, and the retry copy carries the reply address and id.
A reply goes only to a direct reply-to address, never to a queue or an exchange, and only for
a message whose signature (with a key set) was verified.
"""

from __future__ import annotations

import logging

import pydantic_core

from . import chains, results
from . import message as wire
from .errors import (
    BadSignatureError,
    BrokerUnavailableError,
    NobsAmqpError,
    NotFoundError,
    UndecodableMessageError,
    UnroutableError,
)
from .message import printable
from .outcome import Ack, DeadLetter, Happened, Outcome, Refused, RejectToDlx, Requeue, Succeeded
from .session import Session
from .transports.base import until_confirmed
from .worker import Worker

log = logging.getLogger("nobs_amqp")


class Replies:
    """Sends one worker's replies and next chain steps."""

    def __init__(self, session: Session, worker: Worker) -> None:
        self.session = session
        self.worker = worker

    @staticmethod
    def wanted(message: wire.Message) -> bool:
        """Whether `message` asks for anything after it ran (most do not: nothing is done for them)."""
        headers = message.headers
        return wire.REPLY in headers or wire.CHAIN in headers

    async def after(self, message: wire.Message, happened: Happened | None, outcome: Outcome) -> Outcome:
        """Send what `outcome` (final or not) of `message` calls for; the outcome that holds then:
        `outcome`, or `Requeue` when its chain's next step could not be queued because the broker
        is unreachable (it runs again, and queues it then). Never raises."""
        if isinstance(happened, Refused) and isinstance(happened.error, BadSignatureError | UndecodableMessageError):
            return outcome  # nothing it asks for is believed
        if not (isinstance(outcome, DeadLetter | RejectToDlx) or (isinstance(outcome, Ack) and outcome.ran)):
            return outcome  # a retry, a duplicate, or given back: its final outcome comes later
        try:
            await self._after(message, happened, outcome)
        except BrokerUnavailableError as exc:
            log.warning(
                "task %s id %s: the next step of its chain cannot be queued (%s); it goes back to the queue",
                message.task,
                printable(message.message_id),
                printable(exc),
            )
            return Requeue()
        except Exception as exc:  # noqa: BLE001 - the delivery's fate is settled already
            log.warning("id %s: cannot reply or queue the next step: %s", printable(message.message_id), exc)
        return outcome

    async def _after(self, message: wire.Message, happened: Happened | None, outcome: Outcome) -> None:
        reply = message.reply
        try:
            chain = chains.read(message)
        except NobsAmqpError as exc:
            chain = None
            log.error("task %s id %s: %s; no next step", message.task, printable(message.message_id), exc)
        place = chain.place if chain is not None and chain.of > 1 else None
        if isinstance(outcome, DeadLetter | RejectToDlx):
            if reply is not None:
                await self._failed(message, reply, outcome.reason.value, outcome.error, place)
            return
        value = happened.value if isinstance(happened, Succeeded) else None
        if chain is not None and chain.rest:
            problem = await self._next_step(message, chain, value)
            if problem is not None and reply is not None:
                await self._failed(message, reply, "chain_failed", problem, place)
            return
        if reply is not None:
            await self._succeeded(message, reply, value)

    async def _succeeded(self, message: wire.Message, reply: tuple[str, str], value: object) -> None:
        address, reply_id = reply
        now = self.session.now()
        try:
            body = pydantic_core.to_json(value)
        except (pydantic_core.PydanticSerializationError, ValueError, TypeError) as exc:
            log.warning(
                "task %s id %s: its result is not JSON (%s); the caller is told",
                message.task,
                printable(message.message_id),
                printable(exc),
            )
            answer = results.unreadable(message.task, reply_id, self.session.project, now, f"not JSON: {exc}")
        else:
            answer = results.success(message.task, reply_id, body, self.session.project, now)
        await self.session.answer(address, answer)

    async def _failed(
        self,
        message: wire.Message,
        reply: tuple[str, str],
        reason: str,
        error: BaseException | str | None,
        place: str | None,
    ) -> None:
        address, reply_id = reply
        answer = results.failure(message.task, reply_id, self.session.project, self.session.now(), reason, error, place)
        await self.session.answer(address, answer)

    async def _next_step(self, message: wire.Message, chain: chains.Chain, value: object) -> str | None:
        """Queue the step after `message` (confirmed); why it could not be, else None."""
        step = chain.rest[0]
        where = f"task {message.task} id {printable(message.message_id)}: the next step of its chain"
        try:
            worker = self.worker.project.worker(step.worker)
            body = step.body if step.body is not None else pydantic_core.to_json(value)
            now = self.session.now()
            following = wire.new_message(body, step.task, self.session.project, now=now)
            headers = dict(following.headers)
            if message.reply is not None:
                headers[wire.REPLY] = message.reply[1]
            headers[wire.CHAIN] = chain.after().header()
            following = wire.Message(
                body, step.task, following.message_id, following.app_id, now, headers, None, message.reply_to
            )
            await self._send(worker, following)
        except BrokerUnavailableError:
            raise  # nothing was sent: the delivery goes back, and runs again
        except (NobsAmqpError, pydantic_core.PydanticSerializationError, ValueError, TypeError) as exc:
            log.error("%s (%s on worker %s) cannot be queued: %s", where, step.task, step.worker, printable(exc))
            return f"step {chain.step + 1} of {chain.of} ({step.task}) could not be queued: {printable(exc)}"
        log.debug("%s: queued %s on %s as %s", where, step.task, step.worker, following.message_id)
        return None

    async def _send(self, worker: Worker, following: wire.Message) -> None:
        """Publish the next step as a worker places a retry: pursued until confirmed once it may be
        in the queue, declared again once if the broker says something is missing."""
        with until_confirmed():
            try:
                await self.session.send(worker, following, 0)
            except (UnroutableError, NotFoundError):
                self.session.forget_declared(worker)
                await self.session.send(worker, following, 0)
