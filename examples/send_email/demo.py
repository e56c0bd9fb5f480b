"""`make demo`: a worker consumes priority_queue while this script queues a few emails.

One address bounces: its task fails, is retried through the delay ladder with
growing waits, and ends in priority_queue.dlq, where the management UI shows why.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from urllib.parse import quote

from nobs_amqp import message as wire
from nobs_amqp.amqp import redact, vhost_of
from nobs_amqp.management import Management

from .app import SendEmail, priority_queue, project, send_email

DEADLINE_SECONDS = 90


async def main() -> int:
    url = project.urls[0]
    print(f"demo: broker {redact(url)}; starting a worker: nobs-amqp consume priority_queue", flush=True)
    worker = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "nobs_amqp", "--app", "examples.send_email.app:project"),
        *("consume", "priority_queue"),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        return await _run()
    finally:
        worker.send_signal(signal.SIGTERM)
        await asyncio.wait_for(worker.wait(), 40)


async def _run() -> int:
    async with project:
        for address in ("ola@nordmann.no", "kari@nordmann.no", "bounce@nordmann.invalid"):
            message_id = await priority_queue.queue(
                send_email, SendEmail(email=address, content="Hello from nobs_amqp")
            )
            print(f"demo: queued send_email to {address} (message id {message_id})", flush=True)
            if address.endswith(".invalid"):
                bounced = message_id
        await priority_queue.queue(send_email, SendEmail(email="later@nordmann.no", content="sent 3 s later"), delay=3)
        print("demo: queued send_email to later@nordmann.no with delay=3 s", flush=True)
        print("demo: the bounce is retried 4 times with growing waits (about 20 s) ...", flush=True)
        dead = await _wait_for_dead_letter(url=project.urls[0], message_id=bounced)
    if dead is None:
        print(f"demo: the failing task did not reach priority_queue.dlq within {DEADLINE_SECONDS} s", flush=True)
        return 1
    headers = dead["properties"]["headers"]
    vhost = vhost_of(project.urls[0])
    print("\ndemo: the bounced email is in priority_queue.dlq:", flush=True)
    for key in (wire.REASON, wire.ATTEMPT, wire.ERROR_TYPE, wire.ERROR_MESSAGE, wire.FAILED_AT, wire.WORKER_HOST):
        print(f"  {key}: {headers.get(key)}")
    print(f"  body: {dead['payload']}")
    management = Management(project.urls[0]).base
    print(
        f"\nSee it in the management UI (guest/guest): {management}/#/queues/{quote(vhost, safe='')}/"
        f"priority_queue.dlq -> 'Get messages'.\n",
        flush=True,
    )
    return 0


async def _wait_for_dead_letter(url: str, message_id: str) -> dict[str, object] | None:
    management = Management(url)
    path = f"/api/queues/{quote(vhost_of(url), safe='')}/priority_queue.dlq/get"
    deadline = time.monotonic() + DEADLINE_SECONDS
    while time.monotonic() < deadline:
        peeked = await management.request(
            "POST", path, {"count": 1000, "ackmode": "ack_requeue_true", "encoding": "auto"}
        )
        for message in peeked or []:
            if message["properties"].get("message_id") == message_id:
                return message  # type: ignore[no-any-return]
        await asyncio.sleep(1)
    return None


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
