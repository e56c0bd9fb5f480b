"""Reading, replaying and purging a worker's dead-letter queue, on any broker."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable

from .message import Message, replay_copy
from .project import Project
from .topology import dead_letter_queue
from .transport import Delivery
from .worker import Worker

REPLAY_BATCH = 100
# The most dead letters one replay round reads to learn their ids (RabbitMQ's prefetch stops at 65535).
SNAPSHOT_MAX = 10_000
WAIT_SECONDS = 2.0


async def _take(
    project: Project, worker: Worker, limit: int, settle: Callable[[list[Delivery]], Awaitable[int]]
) -> list[Message]:
    """Receive up to `limit` dead letters (as many as are there), hand them to `settle`
    (which returns how many it acked), then give back whatever it left unsettled."""
    queue = dead_letter_queue(worker.name)
    await project.declare(worker, delayed=False)
    before = await project.transport.message_count(queue)
    wanted = min(limit, before)
    received: list[Delivery] = []
    arrived = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        received.append(delivery)
        if len(received) >= wanted:
            arrived.set()

    if wanted == 0:
        return []
    subscription = await project.transport.consume(queue, wanted, handler)
    try:
        await asyncio.wait_for(arrived.wait(), WAIT_SECONDS)
    except TimeoutError:
        pass  # fewer than counted: someone else took some
    finally:
        await subscription.cancel()
    acked = 0
    try:
        acked = await settle(received)
    finally:
        await subscription.close()  # what was not acked goes back, in order
    # The broker puts returned messages back asynchronously: wait until it shows them, so a
    # count or a replay right after this sees the queue as it was.
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while (  # noqa: ASYNC110 - polling the broker: it sends no event when a return lands
        await project.transport.message_count(queue) < before - acked and asyncio.get_running_loop().time() < deadline
    ):
        await asyncio.sleep(0.01)
    return [d.message for d in received]


async def peek(project: Project, worker: Worker, limit: int = 100) -> list[Message]:
    """Up to `limit` dead letters of `worker`, left in the queue."""

    async def leave(deliveries: list[Delivery]) -> int:
        return 0  # unsettled, they go back when the subscription closes

    return await _take(project, worker, limit, leave)


async def replay(
    project: Project, worker: Worker, limit: int | None = None, progress: Callable[[int], None] | None = None
) -> int:
    """Move the dead letters that are in `worker`'s DLQ now (at most `limit`) back to its queue
    with the attempt count reset, each once; each is acked in the DLQ only after its copy was
    confirmed. Returns how many.

    What arrives meanwhile stays in the DLQ: new failures, and copies that a running worker
    failed again. The replay knows the dead letters there at its start by message id (a
    snapshot, counted per id: two dead letters with one id are both replayed) and takes only
    those, in passes, until the snapshot is used up or a pass finds none of it."""
    await project.declare(worker, delayed=False)
    budget = await project.transport.message_count(dead_letter_queue(worker.name))
    budget = min(budget, limit) if limit is not None else budget
    moved = 0
    while moved < budget:
        snapshot = Counter(m.message_id for m in await peek(project, worker, min(SNAPSHOT_MAX, budget - moved)))
        found = await _replay_snapshot(project, worker, snapshot, progress)
        if not found:
            break  # someone else took them
        moved += found
    return moved


async def _replay_snapshot(
    project: Project, worker: Worker, wanted: Counter[str], progress: Callable[[int], None] | None
) -> int:
    """Replay the dead letters whose ids are in `wanted` (as often as counted there), leaving
    every other one in the DLQ. Returns how many were replayed."""
    chosen: list[Delivery] = []

    async def send_back(deliveries: list[Delivery]) -> int:
        chosen.clear()
        for d in deliveries:
            if wanted[d.message.message_id] > 0:
                wanted[d.message.message_id] -= 1
                chosen.append(d)
        await asyncio.gather(*(project.send(worker, replay_copy(d.message), 0) for d in chosen))
        for d in chosen:
            await d.ack()
        return len(chosen)  # the others go back to the DLQ, in order

    moved = 0
    while wanted.total() > 0:
        chosen.clear()
        await _take(project, worker, REPLAY_BATCH, send_back)
        if not chosen:
            break  # a pass found none of them: someone else took them, or others are ahead of them
        moved += len(chosen)
        if progress is not None:
            progress(len(chosen))
    return moved


async def count(project: Project, worker: Worker) -> int:
    """How many dead letters `worker` has."""
    await project.declare(worker, delayed=False)
    return await project.transport.message_count(dead_letter_queue(worker.name))


async def purge(project: Project, worker: Worker) -> int:
    """Delete every dead letter of `worker`; returns how many there were."""
    await project.declare(worker, delayed=False)
    return await project.transport.purge(dead_letter_queue(worker.name))
