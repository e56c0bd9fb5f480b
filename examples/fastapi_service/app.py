"""A FastAPI service that queues background tasks and answers at once.

    uvicorn examples.fastapi_service.app:app                                  # the service
    nobs-amqp --app examples.fastapi_service.tasks:project consume emails     # a worker

`app` opens the project (one connection, a pool of confirm channels) for the life of
the service with `lifespan=project.lifespan`: it only produces. `composed_app` shows a
lifespan of your own that does its setup and then opens the project, and that also
consumes `emails` inside the service when CONSUME_IN_PROCESS=1 (handy in development,
or for a small service that wants no separate worker process).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI
from pydantic import BaseModel

from .tasks import Email, emails, project, send_email

log = logging.getLogger("examples.fastapi_service")

CONSUME_ENV = "CONSUME_IN_PROCESS"

router = APIRouter()


class Queued(BaseModel):
    message_id: str


@router.post("/emails", status_code=202)
async def queue_email(email: Email) -> Queued:
    """Queue the email and answer 202 once the broker has confirmed it; a worker sends it."""
    message_id = await emails.queue(send_email, email)
    return Queued(message_id=message_id)


@router.get("/health")
async def health() -> dict[str, bool]:
    return {"broker": project.is_open}


# Producer only: a worker process runs the tasks.
app = FastAPI(title="fastapi-example", lifespan=project.lifespan)
app.include_router(router)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    """Your own start-up and shut-down around the project's."""
    in_process = os.environ.get(CONSUME_ENV) == "1"
    log.info("fastapi-example: starting (consuming in process: %s)", in_process)  # your setup: settings, pools...
    async with project:  # the broker connection, for queue()
        if in_process:
            async with project.consuming(emails):  # and a consumer of `emails` in this process
                yield {"consuming": True}
        else:
            yield {"consuming": False}
    log.info("fastapi-example: stopped")  # your teardown


composed_app = FastAPI(title="fastapi-example (own lifespan)", lifespan=lifespan)
composed_app.include_router(router)
