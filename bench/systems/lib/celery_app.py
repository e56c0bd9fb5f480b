"""The benchmark's celery app and task (the `celery` CLI imports this module)."""

from __future__ import annotations

from typing import Any

import benchcommon as bc
from celery import Celery

app = Celery("bench", broker=bc.setting("BENCH_URL") or None)
app.conf.update(
    broker_transport_options={"confirm_publish": True},  # py-amqp waits for the publisher confirm
    broker_connection_retry_on_startup=True,
    task_acks_late=True,  # ack after the task ran, as the other systems do
    task_default_queue=bc.setting("BENCH_QUEUE") or "bench",
    task_default_delivery_mode="persistent",  # celery's default, said out loud
    task_ignore_result=True,  # no result backend
    worker_hijack_root_logger=False,
)


@app.task(bind=True, name="bench.send_email")  # default max_retries=3
def send_email(self: Any, email: str, content: str) -> None:
    if bc.fail_once_enabled() and self.request.retries == 0:
        raise self.retry(countdown=bc.RETRY_DELAY)
    bc.task_done(email)
