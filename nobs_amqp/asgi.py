"""FastAPI (any ASGI app) glue: a lifespan that opens the project, and one that also consumes
in-process (`consumer.consuming`).

The public names are `Project.lifespan` and `Project.lifespan_consuming`:

    app = FastAPI(lifespan=project.lifespan)
    app = FastAPI(lifespan=project.lifespan_consuming(priority_queue))
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import Any, Protocol

from .consumer import consuming
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
