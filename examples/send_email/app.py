"""The nobs guide's example: a worker that sends emails.

Run a worker:   nobs-amqp --app examples.send_email.app:project consume priority_queue
Queue a task:   await priority_queue.queue(send_email, SendEmail(email="...", content="..."))
Schedules:      nobs-amqp --app examples.send_email.app:project schedule   (the daily digest)
"""

from __future__ import annotations

import logging

from pydantic import BaseModel

from nobs_amqp import Project, Schedule, Worker

log = logging.getLogger("examples.send_email")

priority_queue = Worker("priority_queue")


class SendEmail(BaseModel):
    email: str
    content: str


class Digest(BaseModel):
    kind: str


async def send_digest(request: Digest) -> None:
    """Every morning at 07:00 Oslo time: the digest of what happened since yesterday."""
    log.info("sent the %s digest", request.kind)


daily_digest = Schedule(
    send_digest, Digest(kind="daily"), worker=priority_queue, cron="0 7 * * *", timezone="Europe/Oslo"
)

project = Project(name="mlops-example", workers=[priority_queue], schedules=[daily_digest])


class MailboxUnavailableError(Exception):
    """The (pretend) mail server refused the address."""


async def send_email(request: SendEmail) -> None:
    if request.email.endswith(".invalid"):
        raise MailboxUnavailableError(f"550 mailbox {request.email} unavailable")
    log.info("sent email to %s: %s", request.email, request.content)
