"""The worker side of the FastAPI example: the project, its `emails` worker and the task.

Run a worker:  nobs-amqp --app examples.fastapi_service.tasks:project consume emails

The service (app.py) imports this module to queue tasks; the worker process imports
it to run them. Neither connects at import time: the broker URL (NOBS_AMQP_URL) is
read when the project opens.

The worker's lifespan opens one HTTP client per worker process, before the first task, and
closes it after the last; every task of that process uses it (`current_task().state`). With
FASTAPI_EXAMPLE_MAIL_API set, `send_email` posts each email there (a mail provider's API);
without it, it records the email in an outbox file instead.

With OpenTelemetry installed (`pip install nobs_amqp[otel]` and an SDK you configure), the
task's own span "send email" nests under the worker's "process emails" span, in the trace of
the request that queued the email.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, Field

from nobs_amqp import Project, Worker, current_task

log = logging.getLogger("examples.fastapi_service")

#: Where the pretend mail server writes what it sent, one JSON line per email.
OUTBOX_ENV = "FASTAPI_EXAMPLE_OUTBOX"
#: A mail provider's HTTP API to post emails to (unset: the outbox file stands in for it).
MAIL_API_ENV = "FASTAPI_EXAMPLE_MAIL_API"


@asynccontextmanager
async def mail_client() -> AsyncIterator[dict[str, Any]]:
    """Once per worker process: one HTTP client (connection pool) for all its tasks."""
    async with httpx.AsyncClient(base_url=os.environ.get(MAIL_API_ENV, ""), timeout=10) as client:
        log.info("emails: mail client open in process %d", os.getpid())
        yield {"http": client}


emails = Worker("emails", concurrency=20, lifespan=mail_client)

project = Project(name="fastapi-example", workers=[emails])


class Email(BaseModel):
    to: str = Field(pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$", max_length=254)
    subject: str = Field(max_length=200)
    body: str = ""


def outbox() -> Path:
    """The file sent emails are recorded in: $FASTAPI_EXAMPLE_OUTBOX, else one in the temp folder."""
    return Path(os.environ.get(OUTBOX_ENV) or Path(tempfile.gettempdir()) / "fastapi-example-outbox.jsonl")


def _append(path: Path, line: str) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(line + "\n")


def _span(name: str) -> AbstractContextManager[object]:
    """A span of the task's own when OpenTelemetry is installed (else nothing)."""
    try:
        from opentelemetry import trace
    except ImportError:
        return contextlib.nullcontext()
    return trace.get_tracer(__name__).start_as_current_span(name)


async def send_email(email: Email) -> None:
    task = current_task()
    http: httpx.AsyncClient = task.state["http"]  # opened once by the worker's lifespan
    with _span("send email"):
        if os.environ.get(MAIL_API_ENV):
            # The message id is the same on every attempt: the provider drops a repeated one.
            headers = {"Idempotency-Key": task.message_id}
            response = await http.post("/send", json=email.model_dump(), headers=headers)
            response.raise_for_status()
        else:
            await asyncio.sleep(0.01)  # stands in for the provider's API
            line = json.dumps(
                {
                    "to": email.to,
                    "subject": email.subject,
                    "pid": os.getpid(),
                    "message_id": task.message_id,
                    "client": id(http),
                }
            )
            await asyncio.to_thread(_append, outbox(), line)
    log.info("sent email to %s: %s", email.to, email.subject)
