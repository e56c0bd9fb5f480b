"""Reading, replaying and purging a worker's dead-letter queue, on any broker."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from .message import Message, replay_copy
from .project import Project
from .topology import dead_letter_queue
from .transport import Delivery
from .worker import Worker

REPLAY_BATCH = 100
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
    """Move up to `limit` dead letters (default all) back to `worker`'s queue with the attempt
    count reset; each is acked in the DLQ only after its copy was confirmed. Returns how many."""
    moved = 0
    remaining = limit if limit is not None else float("inf")
    while remaining > 0:
        batch = int(min(REPLAY_BATCH, remaining))

        async def send_back(deliveries: list[Delivery]) -> int:
            await asyncio.gather(*(project.send(worker, replay_copy(d.message), 0) for d in deliveries))
            for d in deliveries:
                await d.ack()
            return len(deliveries)

        taken = await _take(project, worker, batch, send_back)
        if not taken:
            break
        moved += len(taken)
        remaining -= len(taken)
        if progress is not None:
            progress(len(taken))
    return moved


async def count(project: Project, worker: Worker) -> int:
    """How many dead letters `worker` has."""
    await project.declare(worker, delayed=False)
    return await project.transport.message_count(dead_letter_queue(worker.name))


async def purge(project: Project, worker: Worker) -> int:
    """Delete every dead letter of `worker`; returns how many there were."""
    await project.declare(worker, delayed=False)
    return await project.transport.purge(dead_letter_queue(worker.name))
