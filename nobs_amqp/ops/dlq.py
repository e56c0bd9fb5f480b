"""Reading, replaying and purging a worker's dead-letter queue, on any broker.

A read takes dead letters from the head of `W.dlq` and gives back those it does not settle.
While it runs it holds every message it was handed, so the broker never hands one out twice
and nobody else gets it meanwhile; it takes them in windows that grow with what it has read
(memory and time go with how far it reads, not with the size of the queue), and gives them
all back, in order, when it ends.

Giving a message back has two effects on a quorum queue (RabbitMQ 3.10 and 4.0 alike): it goes
to the back of the queue, and its `x-delivery-count` rises by one. A read of the whole queue
(`peek`) leaves the order as it was; a read that stops early (`find`, `replay`) moves what it
read behind the rest. So the order in the queue says little, and `peek` and `replay` order dead
letters by when they were dead-lettered (`dead_at`), oldest first.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Mapping
from datetime import UTC, datetime
from typing import TypeVar

from .. import message as wire
from ..message import Message, replay_copy
from ..session import Session
from ..topology import dead_letter_queue
from ..transports.base import Delivery, Subscription
from ..worker import Worker

#: Copies of dead letters a replay has in flight at once (the window its read starts with).
REPLAY_BATCH = 100
#: The first window of a read; each next one is as large as all before it, up to MAX_WINDOW.
FIRST_WINDOW = 250
MAX_WINDOW = 8_000
#: A read ends when nothing arrived for this long while it had room: fewer were ready than counted.
IDLE_SECONDS = 1.0

#: What tells one dead letter from another for a replay: message id and when it was dead-lettered.
Key = tuple[str, datetime | None]


def dead_at(message: Message) -> datetime | None:
    """When `message` was dead-lettered: the broker's time (the first `x-death` entry's) for a
    message the broker dead-lettered itself, whose `x-nobs-*` values are whatever its publisher
    wrote; else the worker's `x-nobs-failed-at`. None when it carries neither."""
    deaths = message.headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        moment = deaths[0].get("time")
        if isinstance(moment, datetime):
            return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
        return wire.parse_time(moment)
    return wire.parse_time(message.headers.get(wire.FAILED_AT))


def _age(message: Message) -> float:
    """Sorts oldest first; a dead letter that does not say when it died comes last."""
    moment = dead_at(message)
    return moment.timestamp() if moment is not None else math.inf


def _key(message: Message) -> Key:
    return (message.message_id, dead_at(message))


class _Read:
    """One read of a DLQ from its head: each message goes to `visit`, which returns True if it
    settled (acked) it; a visit stops the read early with `done.set()`."""

    def __init__(self, session: Session, worker: Worker, visit: Callable[[Delivery], Awaitable[bool]]) -> None:
        self._session = session
        self._worker = worker
        self._queue = dead_letter_queue(worker.name)
        self._visit = visit
        self.done = asyncio.Event()
        self.received = 0
        self.settled = 0
        self.held = 0  # visited and left unsettled
        self._total = 0
        self._busy = 0
        self._changed = asyncio.Event()
        self._error: Exception | None = None

    async def _handle(self, delivery: Delivery) -> None:
        if self.done.is_set():
            return  # came after the end: it goes back with the rest
        self.received += 1
        if self.received >= self._total:
            self.done.set()
        self._busy += 1
        try:
            if await self._visit(delivery):
                self.settled += 1
            else:
                self.held += 1
        except Exception as exc:  # noqa: BLE001 - raised from run(), once every message is back
            self._error = self._error or exc
            self.done.set()
        finally:
            self._busy -= 1
            self._changed.set()

    async def run(self, *, window: int = FIRST_WINDOW) -> None:
        """Read until a visit stops it, or every message ready at the start went to a visit."""
        transport = self._session.transport
        await self._session.declare(self._worker, delayed=False)
        self._total = await transport.message_count(self._queue)
        subscriptions: list[Subscription] = []
        capacity = 0
        try:
            while self.received < self._total and not self.done.is_set():
                self._changed.clear()
                if self.held >= capacity:  # every window is full of what stays: open a larger one
                    size = min(MAX_WINDOW, max(window, capacity), self._total - self.received)
                    subscriptions.append(await transport.consume(self._queue, size, self._handle))
                    capacity += size
                    continue
                try:
                    await asyncio.wait_for(self._changed.wait(), IDLE_SECONDS)
                except TimeoutError:
                    if not self._busy:
                        break  # nothing came: fewer are ready than counted (another consumer took some)
        finally:
            self.done.set()
            await self._close(subscriptions)
        if self._error is not None:
            raise self._error

    async def _close(self, subscriptions: list[Subscription]) -> None:
        """Stop every window first (a message given back must not reach a window still open),
        let running visits finish, then give back what is unsettled, oldest window first."""
        for subscription in subscriptions:
            await subscription.cancel()
        while self._busy:
            self._changed.clear()
            await self._changed.wait()
        for subscription in subscriptions:
            await subscription.close()


_T = TypeVar("_T")


def broker_reason(headers: Mapping[str, object]) -> str | None:
    """The broker's reason (`x-death`) for a message it dead-lettered itself, else None."""
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return str(deaths[0].get("reason"))
    return None


def reason_of(message: Message) -> str | None:
    """Why `message` is a dead letter: the broker's reason for one it dead-lettered itself (its
    `x-nobs-*` values are whatever its publisher wrote), else `x-nobs-reason`."""
    reason = broker_reason(message.headers)
    if reason is None and (ours := message.headers.get(wire.REASON)) is not None:
        reason = str(ours)
    return reason


def verified(session: Session, worker: Worker) -> Callable[[Message], bool] | None:
    """With a signing key, a filter of the dead letters a replay may sign again: those whose
    signature verifies and that a worker of ours ran or refused for a reason other than the
    signature. A worker's own dead letter (signed for `W.dlq`) must not say `bad_signature`; one
    the broker dead-lettered itself (it carries `x-death`) must verify as the message first sent
    to `W`. None without a key: a replay then signs nothing."""
    signer = session.signer
    if signer is None:
        return None
    dlq = dead_letter_queue(worker.name)

    def trusted(message: Message) -> bool:
        if broker_reason(message.headers) is not None:
            return signer.problem(message, worker.name) is None
        return (
            message.headers.get(wire.REASON) != wire.Reason.BAD_SIGNATURE.value and signer.problem(message, dlq) is None
        )

    return trusted


def matching(
    *, task: str | None = None, reason: str | None = None, ids: Collection[str] = ()
) -> Callable[[Message], bool]:
    """A filter of dead letters: of task `task` (`module:function`), dead-lettered for `reason`,
    with one of the message ids `ids`; each given one must hold."""
    wanted_ids = frozenset(ids)

    def matches(message: Message) -> bool:
        return (
            (task is None or message.task == task)
            and (reason is None or reason_of(message) == reason)
            and (not wanted_ids or message.message_id in wanted_ids)
        )

    return matches


async def _oldest(
    session: Session,
    worker: Worker,
    limit: float,
    pick: Callable[[Message], _T],
    where: Callable[[Message], bool] | None = None,
) -> list[_T]:
    """`pick` of each of the `limit` oldest dead letters of `worker` (by `dead_at`) that `where`
    takes, oldest first. Reads the whole DLQ, keeping no more than `limit` of them in memory."""
    kept: list[tuple[float, int, _T]] = []  # the newest kept on top: (-age, -arrival, picked)
    arrivals = itertools.count()

    async def keep(delivery: Delivery) -> bool:
        if where is not None and not where(delivery.message):
            return False
        entry = (-_age(delivery.message), -next(arrivals), pick(delivery.message))
        if len(kept) < limit:
            heapq.heappush(kept, entry)
        elif entry[:2] > kept[0][:2]:
            heapq.heapreplace(kept, entry)
        return False

    await _Read(session, worker, keep).run()
    return [picked for *_, picked in sorted(kept, key=lambda entry: entry[:2], reverse=True)]


async def peek(session: Session, worker: Worker, limit: int = 100) -> list[Message]:
    """The `limit` oldest dead letters of `worker` (by `dead_at`), oldest first, left in the
    queue. Reads the whole DLQ to find them."""
    return await _oldest(session, worker, limit, lambda message: message)


async def find(session: Session, worker: Worker, message_id: str) -> Message | None:
    """The first dead letter of `worker` with id `message_id` in queue order, or None. Reads
    from the head and stops there: its time goes with the message's position in the DLQ."""
    found: list[Message] = []
    read: _Read

    async def look(delivery: Delivery) -> bool:
        if delivery.message.message_id == message_id and not found:
            found.append(delivery.message)
            read.done.set()
        return False

    read = _Read(session, worker, look)
    await read.run()
    return found[0] if found else None


class _Admission:
    """Which dead letters a replay takes: those `where` picks (all without it) that `trusted`
    takes (all without it); counts those `where` picked and `trusted` did not."""

    def __init__(self, where: Callable[[Message], bool] | None, trusted: Callable[[Message], bool] | None) -> None:
        self._where = where
        self._trusted = trusted
        self.refused = 0

    def __call__(self, message: Message) -> bool:
        if self._where is not None and not self._where(message):
            return False
        if self._trusted is not None and not self._trusted(message):
            self.refused += 1
            return False
        return True


async def replay(
    session: Session,
    worker: Worker,
    limit: int | None = None,
    progress: Callable[[int], None] | None = None,
    *,
    where: Callable[[Message], bool] | None = None,
    planned: Callable[[int], None] | None = None,
    sign_unverified: bool = False,
    unverified: Callable[[int], None] | None = None,
) -> int:
    """Move the dead letters that are in `worker`'s DLQ now (the `limit` oldest of them, by
    `dead_at`) back to its queue with the attempt count reset, each once; each is acked in the
    DLQ only after its copy was confirmed. Returns how many.

    With a signing key, a copy is signed: only dead letters whose own signature verifies are
    replayed (`verified`), unless `sign_unverified`; `unverified` is told how many of those
    matching `where` stayed in the DLQ for that reason (before any moves). A message dead-lettered
    as `bad_signature` becomes signed only by `sign_unverified`.

    What arrives meanwhile stays in the DLQ: new failures, and copies that a running worker
    failed again. The replay knows the dead letters there at its start by message id and
    dead-letter time (a snapshot, counted: two alike are both replayed) and takes only those,
    in one read from the head that ends once it has them all. `where` (see `matching`) picks
    which dead letters; `planned` is told how many the snapshot holds before any moves."""
    admitted = _Admission(where, None if sign_unverified else verified(session, worker))
    wanted = Counter(await _oldest(session, worker, math.inf if limit is None else limit, _key, admitted))
    if unverified is not None:
        unverified(admitted.refused)
    if planned is not None:
        planned(wanted.total())
    moved = 0
    read: _Read

    async def send_back(delivery: Delivery) -> bool:
        nonlocal moved
        key = _key(delivery.message)
        if wanted[key] <= 0:
            return False  # not in the snapshot: it stays
        wanted[key] -= 1
        if wanted.total() == 0:
            read.done.set()
        try:
            await session.send(worker, replay_copy(delivery.message, now=session.now()), 0)
        except BaseException:
            wanted[key] += 1
            raise
        await delivery.ack()
        moved += 1
        if progress is not None:
            progress(1)
        return True

    if wanted.total():
        read = _Read(session, worker, send_back)
        await read.run(window=REPLAY_BATCH)
    return moved


async def count(session: Session, worker: Worker) -> int:
    """How many dead letters `worker` has."""
    await session.declare(worker, delayed=False)
    return await session.transport.message_count(dead_letter_queue(worker.name))


async def purge(session: Session, worker: Worker) -> int:
    """Delete every dead letter of `worker`; returns how many there were."""
    await session.declare(worker, delayed=False)
    return await session.transport.purge(dead_letter_queue(worker.name))
