"""FastAPI (any ASGI app) glue: a lifespan that opens the project, and consuming in-process.

The public names are `Project.lifespan`, `Project.lifespan_consuming` and `Project.consuming`:

    app = FastAPI(lifespan=project.lifespan)
    app = FastAPI(lifespan=project.lifespan_consuming(priority_queue))
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import Any, Protocol

from .consumer import Consumer
from .session import Session
from .worker import Worker

log = logging.getLogger("nobs_amqp")


class Opens(Protocol):
    """A project, as far as a lifespan needs it: opened and closed by `async with`, then its session."""

    async def __aenter__(self) -> object: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    @property
    def session(self) -> Session: ...


@asynccontextmanager
async def lifespan(project: Opens) -> AsyncIterator[None]:
    """Open `project` on startup, close it on shutdown."""
    async with project:
        yield


def lifespan_consuming(
    project: Opens, workers: Sequence[Worker], **options: Any
) -> Callable[[object], AbstractAsyncContextManager[None]]:
    """A lifespan that opens `project` and consumes `workers` in this process while the app runs."""

    @asynccontextmanager
    async def run(app: object = None) -> AsyncIterator[None]:
        async with project, consuming(project.session, workers, **options):
            yield

    return run


@asynccontextmanager
async def consuming(session: Session, workers: Sequence[Worker], **options: Any) -> AsyncIterator[list[Consumer]]:
    """Consume `workers` in the background until the block ends (each is ready when it starts);
    then stop taking messages and let running tasks finish (`grace_period`)."""
    consumers = [Consumer(session, worker, **options) for worker in workers]
    runs = [asyncio.create_task(c.run(), name=f"nobs-consume-{c.worker.name}") for c in consumers]
    try:
        for consumer, run in zip(consumers, runs, strict=True):
            ready = asyncio.create_task(consumer.ready.wait())
            await asyncio.wait({run, ready}, return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            if run.done():
                run.result()  # raise what stopped it from starting
        yield consumers
    finally:
        for consumer in consumers:
            consumer.stop()
        for result in await asyncio.gather(*runs, return_exceptions=True):
            if isinstance(result, Exception):
                log.error("consumer stopped with an error: %s", result)
