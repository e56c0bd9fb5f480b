"""Helpers for testing code that queues tasks: run what is queued, on any broker."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from . import ladder
from .consumer import Consumer
from .errors import ConfigurationError
from .project import URL_ENV, Project, project_urls
from .session import Session
from .sync import SyncProducer
from .transports.base import VirtualClock
from .worker import Worker

POLL_SECONDS = 0.05


async def drain(
    project: Project | Session,
    *workers: Worker | str,
    timeout: float = 60.0,  # noqa: ASYNC109
    raise_errors: bool = False,
) -> int:
    """Run every task queued for `workers` (default: all of the project's), retries and delayed
    tasks included, until nothing is left; return how many messages were processed.

    On `memory://` the virtual clock jumps to each delayed message, so a five-minute delay
    or a retry ladder takes no time (the retry policy reads the same clock), and to each
    expiry of a rate limit's window when every running task waits for a permit. On RabbitMQ
    delays take their real time. Either way, raises TimeoutError if work is still pending
    after `timeout` seconds of real time.

    `raise_errors=True`: stop at the first exception a task raises (not `Retry` or `Reject`)
    and raise that exception itself, with its traceback, once running tasks are done. Its
    message is settled as the retry policy says (retried later or dead-lettered).
    """
    session = project.session if isinstance(project, Project) else project
    owner = project if isinstance(project, Project) else None
    chosen = _workers(owner, workers)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    processed = 0
    for worker in chosen:
        await session.declare(worker, delayed=True)  # the ladder it looks into must exist
    while True:
        for worker in chosen:
            consumer = Consumer(session, worker, burst=True, fail_fast=raise_errors)
            try:
                async with asyncio.timeout_at(deadline):
                    await _run(consumer, session.transport)
            except TimeoutError:
                raise TimeoutError(f"tasks of {worker.name} still running after {timeout} s") from None
            processed += consumer.processed
        # A delayed message can leave the ladder for its queue between the two looks:
        # only an empty ladder followed by empty queues means nothing is left.
        if not await _delayed(session) and not await _ready(session, chosen):
            return processed
        if loop.time() > deadline:
            raise TimeoutError(f"tasks still queued or delayed in {session.project}.delay.* after {timeout} s")
        clock = session.transport
        if isinstance(clock, VirtualClock):
            await clock.advance(clock.seconds_to_next_expiry() or 0)
        else:
            await asyncio.sleep(POLL_SECONDS)


def drain_sync(
    producer: SyncProducer, *workers: Worker | str, timeout: float = 60.0, raise_errors: bool = False
) -> int:
    """`drain()` for sync tests (Django, Flask), on the connection and I/O thread of `producer`
    (`project.sync()`), which is opened if it was not: `assert drain_sync(project.sync()) == 1`."""
    project = producer.project
    if not isinstance(project, Project):
        raise ConfigurationError("drain_sync() needs the producer of a Project (project.sync())")
    chosen = _workers(project, workers)
    return producer._call(
        "drain",
        lambda session: drain(session, *chosen, timeout=timeout, raise_errors=raise_errors),
        timeout,
        deadline=False,
    )


async def _run(consumer: Consumer, clock: object) -> None:
    """Run `consumer` to its end; on a virtual clock, whenever all of its tasks wait for a rate
    limit's permit, move the clock to the next expiry (a permit's marker, or a delayed message)."""
    run = asyncio.ensure_future(consumer.run())
    try:
        while not run.done():
            await asyncio.wait({run}, timeout=POLL_SECONDS)
            if not run.done() and isinstance(clock, VirtualClock) and consumer.stalled_on_rate_limits:
                await clock.advance(clock.seconds_to_next_expiry() or 0)
    finally:
        if not run.done():
            run.cancel()
            await asyncio.wait({run})
    run.result()


def _workers(project: Project | None, workers: tuple[Worker | str, ...]) -> list[Worker]:
    if project is not None:
        return [project.worker(w) if isinstance(w, str) else w for w in workers] or list(project.workers.values())
    if not workers or any(isinstance(w, str) for w in workers):
        raise ConfigurationError("drain(session, ...) needs the Worker objects to drain; or pass the project")
    return [w for w in workers if isinstance(w, Worker)]


async def _ready(session: Session, workers: list[Worker]) -> int:
    return sum([await session.transport.message_count(worker.name) for worker in workers])


async def _delayed(session: Session) -> int:
    """Messages waiting in the project's delay ladder."""
    levels = (ladder.level_name(session.project, level) for level in range(ladder.LEVELS))
    return sum([await session.transport.message_count(name) for name in levels])


@contextmanager
def use_broker(project: Project, url: str | Sequence[str] | None = None) -> Iterator[Project]:
    """Point `project` at a test broker for the block, whatever `Project(url=...)` it was built with.

    `url` defaults to NOBS_AMQP_URL, which the `nobs_amqp_url` and `nobs_amqp_memory` fixtures set:

        @pytest.fixture(autouse=True)
        def test_broker(nobs_amqp_memory):
            with use_broker(project):
                yield

    Open (and close) the project inside the block: an open project keeps its connection. The
    project's sync producer (`project.sync()`) is disconnected as the block starts and ends, and
    connects again on its next use: to the test broker inside the block.
    """
    if url is None:
        url = os.environ.get(URL_ENV)
        if not url:
            raise ConfigurationError(
                f"use_broker({project.name!r}) needs a url, or {URL_ENV} set (the nobs_amqp_url and "
                f"nobs_amqp_memory fixtures set it)"
            )
    project_urls(url)  # a malformed URL fails here, never showing its credentials
    if project.is_open:
        raise ConfigurationError(
            f"project {project.name!r} is already open: enter use_broker() before `async with project`"
        )
    previous = project._url
    _disconnected(project)  # its sync producer connects again, to the test broker
    project._url = url
    try:
        yield project
    finally:
        project._url = previous
        _disconnected(project)


def _disconnected(project: Project) -> None:
    if project._sync is not None:
        project._sync.disconnect()
