"""The benchmark's dramatiq broker and actor (the `dramatiq` CLI imports this module)."""

from __future__ import annotations

import benchcommon as bc
import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.middleware import CurrentMessage

# Publisher confirms (and with them `mandatory`) on: dramatiq's reliable setting; default middleware
# (retries: max_retries=20, exponential backoff), plus CurrentMessage so a task can see its retry count.
broker = RabbitmqBroker(url=bc.setting("BENCH_URL") or None, confirm_delivery=True)
broker.add_middleware(CurrentMessage())
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=bc.setting("BENCH_QUEUE") or "bench")
def send_email(email: str, content: str) -> None:
    if bc.fail_once_enabled():
        message = CurrentMessage.get_current_message()
        if message is not None and not message.options.get("retries"):
            raise dramatiq.Retry(delay=int(bc.RETRY_DELAY * 1000))  # retried by the Retries middleware
    bc.task_done(email)
