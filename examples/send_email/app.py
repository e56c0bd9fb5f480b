"""The nobs guide's example: a worker that sends emails.

Run a worker:   nobs-amqp --app examples.send_email.app:project consume priority_queue
Queue a task:   await priority_queue.queue(send_email, SendEmail(email="...", content="..."))
"""

from __future__ import annotations

import logging

from pydantic import BaseModel

from nobs_amqp import Project, Worker

log = logging.getLogger("examples.send_email")

priority_queue = Worker("priority_queue")

project = Project(name="mlops-example", workers=[priority_queue])


class SendEmail(BaseModel):
    email: str
    content: str


class MailboxUnavailableError(Exception):
    """The (pretend) mail server refused the address."""


async def send_email(request: SendEmail) -> None:
    if request.email.endswith(".invalid"):
        raise MailboxUnavailableError(f"550 mailbox {request.email} unavailable")
    log.info("sent email to %s: %s", request.email, request.content)
