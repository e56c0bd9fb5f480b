"""Helpers for testing code that queues tasks: run what is queued, on any broker."""

from __future__ import annotations

import asyncio
import time

from . import delay as ladder
from .consumer import Consumer
from .memory import MemoryTransport
from .project import Project
from .worker import Worker

POLL_SECONDS = 0.05


async def drain(project: Project, *workers: Worker | str, timeout: float = 60.0) -> int:  # noqa: ASYNC109
    """Run every task queued for `workers` (default: all of the project's), retries and delayed
    tasks included, until nothing is left; return how many messages were processed.

    On `memory://` the virtual clock jumps to each delayed message, so a five-minute delay
    or a retry ladder takes no time. On RabbitMQ delays take their real time, up to `timeout`.
    Raises TimeoutError if work is still pending after `timeout` seconds.
    """
    chosen = [project.worker(w) if isinstance(w, str) else w for w in workers] or list(project.workers.values())
    deadline = time.monotonic() + timeout
    processed = 0
    for worker in chosen:
        await project.declare(worker, delayed=True)  # the ladder it looks into must exist
    while True:
        for worker in chosen:
            consumer = Consumer(project, worker, burst=True)
            await asyncio.wait_for(consumer.run(), max(0.1, deadline - time.monotonic()))
            processed += consumer.processed
        # A delayed message can leave the ladder for its queue between the two looks:
        # only an empty ladder followed by empty queues means nothing is left.
        if not await _delayed(project) and not await _ready(project, chosen):
            return processed
        transport = project.transport
        if isinstance(transport, MemoryTransport):
            await transport.broker.advance(transport.broker.seconds_to_next_expiry() or 0)
        elif time.monotonic() > deadline:
            raise TimeoutError(f"tasks still delayed in {project.name}.delay.* after {timeout} s")
        else:
            await asyncio.sleep(POLL_SECONDS)


async def _ready(project: Project, workers: list[Worker]) -> int:
    return sum([await project.transport.message_count(worker.name) for worker in workers])


async def _delayed(project: Project) -> int:
    """Messages waiting in the project's delay ladder."""
    transport = project.transport
    if isinstance(transport, MemoryTransport):
        return transport.broker.waiting(ladder.level_name(project.name, level) for level in range(ladder.LEVELS))
    return sum([await transport.message_count(ladder.level_name(project.name, n)) for n in range(ladder.LEVELS)])
