"""The benchmark's taskiq broker and task (the `taskiq worker` CLI imports this module)."""

from __future__ import annotations

import benchcommon as bc
from taskiq import Context, SmartRetryMiddleware, TaskiqDepends
from taskiq_aio_pika import AioPikaBroker, Queue

TUNED_QOS = 10  # qos 50 and 200, and --workers 1, were all slower than the defaults here
QUEUE = bc.setting("BENCH_QUEUE") or "bench"

# Defaults: qos (prefetch) 10, queue type quorum, persistent messages on a confirm channel.
# Retries: SmartRetryMiddleware with a fixed 1 s delay through a TTL delay queue (needs `delay_queue`).
broker = AioPikaBroker(
    bc.setting("BENCH_URL") or None,
    qos=TUNED_QOS if bc.tuned() else 10,
    task_queues=[Queue(name=QUEUE)],
    dead_letter_queue=Queue(name=f"{QUEUE}.dead_letter"),
    delay_queue=Queue(name=f"{QUEUE}.delay"),
).with_middlewares(SmartRetryMiddleware(default_retry_count=3, default_delay=bc.RETRY_DELAY))


@broker.task(retry_on_error=True)
async def send_email(email: str, content: str, context: Context = TaskiqDepends()) -> None:  # noqa: B008 - taskiq style
    if bc.fail_once_enabled() and not context.message.labels.get("_retries"):
        raise bc.FailOnceError(email)
    bc.task_done(email)
