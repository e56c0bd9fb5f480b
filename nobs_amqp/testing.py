"""Helpers for testing code that queues tasks: run what is queued, on any broker."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from . import delay as ladder
from .consumer import Consumer
from .errors import ConfigurationError
from .memory import MemoryTransport
from .project import URL_ENV, Project, broker_urls
from .worker import Worker

POLL_SECONDS = 0.05


async def drain(
    project: Project,
    *workers: Worker | str,
    timeout: float = 60.0,  # noqa: ASYNC109
    raise_errors: bool = False,
) -> int:
    """Run every task queued for `workers` (default: all of the project's), retries and delayed
    tasks included, until nothing is left; return how many messages were processed.

    On `memory://` the virtual clock jumps to each delayed message, so a five-minute delay
    or a retry ladder takes no time. On RabbitMQ delays take their real time, up to `timeout`.
    Raises TimeoutError if work is still pending after `timeout` seconds.

    `raise_errors=True`: stop at the first exception a task raises (not `Retry` or `Reject`)
    and raise that exception itself, with its traceback, once running tasks are done. Its
    message is settled as the retry policy says (retried later or dead-lettered).
    """
    chosen = [project.worker(w) if isinstance(w, str) else w for w in workers] or list(project.workers.values())
    deadline = time.monotonic() + timeout
    processed = 0
    for worker in chosen:
        await project.declare(worker, delayed=True)  # the ladder it looks into must exist
    while True:
        for worker in chosen:
            consumer = Consumer(project, worker, burst=True, fail_fast=raise_errors)
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


@contextmanager
def use_broker(project: Project, url: str | Sequence[str] | None = None) -> Iterator[Project]:
    """Point `project` at a test broker for the block, whatever `Project(url=...)` it was built with.

    `url` defaults to NOBS_AMQP_URL, which the `nobs_amqp_url` and `nobs_amqp_memory` fixtures set:

        @pytest.fixture(autouse=True)
        def test_broker(nobs_amqp_memory):
            with use_broker(project):
                yield

    Open (and close) the project inside the block: an open project keeps its connection.
    """
    if url is None:
        url = os.environ.get(URL_ENV)
        if not url:
            raise ConfigurationError(
                f"use_broker({project.name!r}) needs a url, or {URL_ENV} set (the nobs_amqp_url and "
                f"nobs_amqp_memory fixtures set it)"
            )
    broker_urls(url)  # a malformed URL fails here, never showing its credentials
    if project.is_open:
        raise ConfigurationError(
            f"project {project.name!r} is already open: enter use_broker() before `async with project`"
        )
    previous = project._url
    project._url = url
    try:
        yield project
    finally:
        project._url = previous
