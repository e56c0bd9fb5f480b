"""Cancelled message ids: `Worker.cancel(id)` appends the id to the worker's stream `W.cancelled`
(a RabbitMQ stream, kept `topology.CANCEL_RETENTION`); every consuming process of a worker with
`cancellable=True` reads that stream from its start, then follows it, and dead-letters a delivery
whose id it holds (reason `cancelled`) instead of running it: one queued now, one waiting in the
delay ladder, or a retry. A task already running is not interrupted.

At start a consumer appends a fence of its own to the stream and takes no message before it has
read up to it: every cancellation confirmed before the consumer started is known by then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime

import orjson

from .errors import NobsAmqpError
from .message import ENQUEUED_AT, Message, format_time, new_id, printable
from .session import Session
from .topology import cancellations
from .transports.base import ConnectionEvents, Subscription, one_deadline

log = logging.getLogger("nobs_amqp")

#: The `type` of a cancellation in `W.cancelled` (its message id is the cancelled id), and of a fence.
CANCEL = "nobs.cancel"
FENCE = "nobs.fence"
#: How long a consumer waits at start to have read every cancellation made before it.
CATCH_UP_SECONDS = 10.0
#: The most ids a process keeps (the newest): a stream flooded with cancellations costs a worker
#: at most this many ids of memory (about 25 MiB), not the whole stream.
MAX_CANCELLED = 100_000


def cancel_message(message_id: str, project: str, now: datetime) -> Message:
    """What `Worker.cancel(message_id)` appends to the worker's stream, sent `now`."""
    body = orjson.dumps({"message_id": message_id, "cancelled_at": format_time(now)})
    return Message(body, CANCEL, message_id, project, now, {ENQUEUED_AT: format_time(now)})


class Cancellations:
    """The ids cancelled for one worker, as this process read them from `W.cancelled`."""

    def __init__(self, session: Session, worker: str) -> None:
        self.session = session
        self.worker = worker
        self.stream = cancellations(worker)
        self._ids: dict[str, None] = {}  # oldest first
        self._fences: dict[str, asyncio.Event] = {}
        self._subscription: Subscription | None = None
        self._current = asyncio.Event()  # the stream was read up to a fence on this connection
        self._catching_up: asyncio.Task[None] | None = None
        #: Entries of the stream refused: unsigned or forged while the project signs.
        self.refused = 0

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def _read(self, message: Message) -> None:
        if message.task == FENCE:
            fence = self._fences.get(message.message_id)
            if fence is not None:
                fence.set()
            return
        if message.task != CANCEL or not message.message_id:
            return
        signer = self.session.signer
        if signer is not None and (problem := signer.problem(message, self.stream)) is not None:
            self.refused += 1
            log.warning(
                "worker %s: ignoring a cancellation of id %s in %s: %s",
                self.worker,
                printable(message.message_id, 200),
                self.stream,
                problem,
            )
            return
        self._ids[message.message_id] = None
        if len(self._ids) > MAX_CANCELLED:
            del self._ids[next(iter(self._ids))]

    async def start(self) -> None:
        """Follow the stream; return once every cancellation made before now was read (or after
        CATCH_UP_SECONDS, with a warning, if the broker does not let the fence through). After a
        lost connection, deliveries wait (`current`) until the stream was read again up to a new fence."""
        transport = self.session.transport
        self._subscription = await transport.follow(self.stream, self._read)
        if isinstance(transport, ConnectionEvents):
            transport.on_connection.append(self._connection)
        await self._catch_up()

    def _connection(self, up: bool) -> None:
        if not up:
            self._current.clear()  # the stream is read again from its start on the new connection
        elif self._catching_up is None or self._catching_up.done():
            self._catching_up = asyncio.get_running_loop().create_task(self._catch_up())

    async def _catch_up(self) -> None:
        fence, seen = new_id(), asyncio.Event()
        self._fences[fence] = seen
        try:
            async with asyncio.timeout(CATCH_UP_SECONDS):
                with one_deadline(CATCH_UP_SECONDS):
                    now = self.session.now()
                    message = Message(b"{}", FENCE, fence, self.session.project, now)
                    await self.session.transport.publish("", self.stream, message)
                await seen.wait()
        except (NobsAmqpError, TimeoutError, ConnectionError) as exc:
            log.warning(
                "worker %s: could not read all of %s within %.0f s (%s); a task cancelled just now may still run",
                self.worker,
                self.stream,
                CATCH_UP_SECONDS,
                printable(exc) or type(exc).__name__,
            )
        finally:
            del self._fences[fence]
            self._current.set()
        log.debug("worker %s: %d cancelled id(s) known", self.worker, len(self._ids))

    async def current(self) -> None:
        """Return once the stream was read up to a fence on the current connection (at once,
        unless the connection was lost since; at most CATCH_UP_SECONDS)."""
        if not self._current.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CATCH_UP_SECONDS):
                    await self._current.wait()

    async def stop(self) -> None:
        transport = self.session.transport
        if isinstance(transport, ConnectionEvents) and self._connection in transport.on_connection:
            transport.on_connection.remove(self._connection)
        if self._catching_up is not None:
            self._catching_up.cancel()
            await asyncio.gather(self._catching_up, return_exceptions=True)
        if self._subscription is not None:
            await self._subscription.close()
            self._subscription = None
