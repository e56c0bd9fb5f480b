"""Raw aio-pika baseline: confirmed, persistent, mandatory publishes to the default exchange; a
`queue.consume` worker that acks after running the no-op. The retry phase uses a retry queue with a
1 s `x-message-ttl` that dead-letters back into the queue (the minimal durable delayed retry)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import uuid
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent / "lib")  # this file's name must not shadow the library

import aio_pika  # noqa: E402
import benchcommon as bc  # noqa: E402

PREFETCH_DEFAULT = 10  # aio-pika's README consumer example
PREFETCH_TUNED = 200
ATTEMPT = "x-attempt"


def _message(body: bytes, attempt: int = 1) -> aio_pika.Message:
    return aio_pika.Message(
        body,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        content_type="application/json",
        message_id=uuid.uuid4().hex,
        headers={ATTEMPT: attempt},
    )


def produce(args: bc.Args) -> dict[str, object]:
    async def run() -> dict[str, object]:
        connection = await aio_pika.connect_robust(args.url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            await channel.declare_queue(args.queue, durable=True)
            exchange = channel.default_exchange

            async def publish(payload: dict[str, str]) -> None:
                await exchange.publish(_message(json.dumps(payload).encode()), args.queue, mandatory=True)

            return await bc.drive_async(args, publish)

    result, loop = bc.run_async(run)
    return {**result, "loop": loop}


def noop(payload: dict[str, str]) -> None:
    if bc.fail_once_enabled() and bc.first_time(payload["email"]):
        raise bc.FailOnceError(payload["email"])
    bc.task_done(payload["email"])


async def consume(args: bc.Args) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    connection = await aio_pika.connect_robust(args.url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH_TUNED if args.tuned else PREFETCH_DEFAULT)
        queue = await channel.declare_queue(args.queue, durable=True)
        retries = await connection.channel(publisher_confirms=True)
        retry_queue = f"{args.queue}.retry"
        arguments = {"x-message-ttl": int(bc.RETRY_DELAY * 1000), "x-dead-letter-exchange": ""}
        await retries.declare_queue(
            retry_queue, durable=True, arguments={**arguments, "x-dead-letter-routing-key": args.queue}
        )

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            attempt = int(message.headers.get(ATTEMPT, 1))  # type: ignore[arg-type]
            try:
                noop(json.loads(message.body))
            except bc.FailOnceError:
                await retries.default_exchange.publish(_message(message.body, attempt + 1), retry_queue)
            await message.ack()

        await queue.consume(on_message)
        await stop.wait()


def worker(args: bc.Args) -> None:
    # Plain asyncio, as the nobs_amqp CLI worker runs: the workers compare like with like.
    bc.run_async(lambda: consume(args), use_uvloop=False)


if __name__ == "__main__":
    bc.main(produce, worker)
