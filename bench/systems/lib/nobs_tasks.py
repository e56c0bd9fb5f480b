"""The benchmark's nobs_amqp project: one worker named after $BENCH_QUEUE, one no-op task."""

from __future__ import annotations

import benchcommon as bc
from pydantic import BaseModel
from tenacity import wait_fixed

from nobs_amqp import Project, Worker


class SendEmail(BaseModel):
    email: str
    content: str


async def send_email(request: SendEmail) -> None:
    if bc.fail_once_enabled() and bc.first_time(request.email):
        raise bc.FailOnceError(request.email)
    bc.task_done(request.email)


# Default settings, except a fixed 1 s wait in the retry phase (default: exponential from 1 s plus jitter).
# With $BENCH_WORKERS (project_scale), the project has that many workers, Q-w000, Q-w001, ...
QUEUE = bc.setting("BENCH_QUEUE") or "bench"
WAIT = wait_fixed(bc.RETRY_DELAY) if bc.fail_once_enabled() else None
SCALE = int(bc.setting("BENCH_WORKERS") or 0)
workers = [Worker(f"{QUEUE}-w{i:03d}", wait=WAIT) for i in range(SCALE)] if SCALE else [Worker(QUEUE, wait=WAIT)]
worker = workers[0]
project = Project(name="bench", workers=workers, url=bc.setting("BENCH_URL") or None)
