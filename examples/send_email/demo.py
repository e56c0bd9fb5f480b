"""`make demo`: a worker consumes priority_queue while this script queues a few emails.

One address bounces: its task fails, is retried through the delay ladder with
growing waits, and ends in priority_queue.dlq, where the management UI shows why.

On RabbitMQ the demo runs in a vhost of its own, made through the management API
and deleted at the end (`--keep`, or `make demo KEEP=1`, keeps it to look at in the
management UI). With NOBS_AMQP_URL=memory:// (what `make demo` falls back to when no
RabbitMQ can be reached or started) the same runs on the in-memory broker, worker included.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Mapping
from urllib.parse import quote

from nobs_amqp import message as wire
from nobs_amqp.errors import NobsAmqpError
from nobs_amqp.management import Management
from nobs_amqp.transports.memory import MemoryBroker
from nobs_amqp.urls import in_process, redact, vhost_of, with_vhost

from .app import SendEmail, priority_queue, project, send_email

DEADLINE_SECONDS = 90
VHOST_PREFIX = "nobs-amqp-demo-"


async def main(keep: bool = False) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    url = project.urls[0]
    if in_process(url):
        print("demo: running on the in-memory broker (memory://): no RabbitMQ, nothing is kept", flush=True)
        async with project, project.consuming(priority_queue):
            return await _run(url)
    management = Management(url)
    vhost = f"{VHOST_PREFIX}{int(time.time())}-{uuid.uuid4().hex[:6]}"
    try:
        await asyncio.to_thread(management.create_vhost, vhost)
    except NobsAmqpError as exc:
        print(f"demo: cannot make a vhost of its own through the management API: {exc}", flush=True)
        return 1
    url = with_vhost(url, vhost)
    os.environ["NOBS_AMQP_URL"] = url  # for the project here and the worker process
    try:
        code = await _with_worker(url)
    finally:
        if not keep:
            await asyncio.to_thread(management.delete_vhost, vhost)
    if keep:
        print(f"demo: kept vhost {vhost!r}; delete it with `rabbitmqctl delete_vhost {vhost}`", flush=True)
    else:
        print(f"demo: deleted its vhost {vhost!r} and everything in it", flush=True)
    return code


async def _with_worker(url: str) -> int:
    print(f"demo: broker {redact(url)}; starting a worker: nobs-amqp consume priority_queue", flush=True)
    worker = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "nobs_amqp", "--app", "examples.send_email.app:project"),
        *("consume", "priority_queue"),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        async with project:
            return await _run(url)
    finally:
        worker.send_signal(signal.SIGTERM)
        await asyncio.wait_for(worker.wait(), 40)


async def _run(url: str) -> int:
    bounced = ""
    for address in ("ola@nordmann.no", "kari@nordmann.no", "bounce@nordmann.invalid"):
        message_id = await priority_queue.queue(send_email, SendEmail(email=address, content="Hello from nobs_amqp"))
        print(f"demo: queued send_email to {address} (message id {message_id})", flush=True)
        if address.endswith(".invalid"):
            bounced = message_id
    await priority_queue.queue(send_email, SendEmail(email="later@nordmann.no", content="sent 3 s later"), delay=3)
    print("demo: queued send_email to later@nordmann.no with delay=3 s", flush=True)
    print("demo: the bounce is retried 4 times with growing waits (about 20 s; virtual on memory://) ...", flush=True)
    deadline = time.monotonic() + DEADLINE_SECONDS
    while (dead := await _find_dead_letter(url, bounced)) is None and time.monotonic() < deadline:
        await _a_second(url)  # polling the broker: it sends no event for "arrived in a queue"
    if dead is None:
        print(f"demo: the failing task did not reach priority_queue.dlq within {DEADLINE_SECONDS} s", flush=True)
        return 1
    headers, body = dead
    print("\ndemo: the bounced email is in priority_queue.dlq:", flush=True)
    for key in (wire.REASON, wire.ATTEMPT, wire.ERROR_TYPE, wire.ERROR_MESSAGE, wire.FAILED_AT, wire.WORKER_HOST):
        print(f"  {key}: {headers.get(key)}")
    print(f"  body: {body}")
    if not in_process(url):
        ui = f"{Management(url).base}/#/queues/{quote(vhost_of(url), safe='')}/priority_queue.dlq"
        print(f"\nSee it in the management UI (guest/guest): {ui} -> 'Get messages'", flush=True)
        print("(the demo deletes its vhost when it ends unless run with --keep, or `make demo KEEP=1`)\n", flush=True)
    return 0


async def _a_second(url: str) -> None:
    """Let a second pass: on memory:// time is virtual, so move it on instead of waiting."""
    if in_process(url):
        await MemoryBroker.named(url).advance(1)
        await asyncio.sleep(0.05)  # the worker runs what fell due
    else:
        await asyncio.sleep(1)


async def _find_dead_letter(url: str, message_id: str) -> tuple[Mapping[str, object], str] | None:
    """Headers and body of the dead letter `message_id`, left in the DLQ for the management UI."""
    if in_process(url):
        for message in MemoryBroker.named(url).messages("priority_queue.dlq"):
            if message.message_id == message_id:
                return message.headers, message.body.decode()
        return None
    path = f"/api/queues/{quote(vhost_of(url), safe='')}/priority_queue.dlq/get"
    peeked = await Management(url).request(
        "POST", path, {"count": 1000, "ackmode": "ack_requeue_true", "encoding": "auto"}
    )
    for message in peeked or []:
        if message["properties"].get("message_id") == message_id:
            return message["properties"]["headers"], str(message["payload"])
    return None


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--keep", action="store_true", help="keep the demo's vhost to look at it afterwards")
    sys.exit(asyncio.run(main(keep=parser.parse_args().keep)))
