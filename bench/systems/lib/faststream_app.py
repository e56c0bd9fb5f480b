"""The benchmark's FastStream app (the `faststream run` CLI imports this module)."""

from __future__ import annotations

import benchcommon as bc
from faststream import FastStream
from faststream.rabbit import Channel, RabbitBroker, RabbitQueue

TUNED_PREFETCH = 200

# Channels confirm publishes by default (Channel.publisher_confirms=True); `mandatory` is on by default.
broker = RabbitBroker(bc.setting("BENCH_URL") or "amqp://guest:guest@localhost:5672/")
app = FastStream(broker)
queue = RabbitQueue(bc.setting("BENCH_QUEUE") or "bench", durable=True)
# Default ack policy (REJECT_ON_ERROR): ack after the handler returns. Default channel: no prefetch limit.
channel = Channel(prefetch_count=TUNED_PREFETCH) if bc.tuned() else None


@broker.subscriber(queue, channel=channel)
async def send_email(email: str, content: str) -> None:
    bc.task_done(email)
