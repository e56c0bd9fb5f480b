"""The worker side of the FastAPI example: the project, its `emails` worker and the task.

Run a worker:  nobs-amqp --app examples.fastapi_service.tasks:project consume emails

The service (app.py) imports this module to queue tasks; the worker process imports
it to run them. Neither connects at import time: the broker URL (NOBS_AMQP_URL) is
read when the project opens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
from pathlib import Path

from pydantic import BaseModel, Field

from nobs_amqp import Project, Worker

log = logging.getLogger("examples.fastapi_service")

#: Where the pretend mail server writes what it sent, one JSON line per email.
OUTBOX_ENV = "FASTAPI_EXAMPLE_OUTBOX"

emails = Worker("emails", concurrency=20)

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


async def send_email(email: Email) -> None:
    await asyncio.sleep(0.01)  # stands in for talking to an SMTP server
    line = json.dumps({"to": email.to, "subject": email.subject, "pid": os.getpid()})
    await asyncio.to_thread(_append, outbox(), line)
    log.info("sent email to %s: %s", email.to, email.subject)
