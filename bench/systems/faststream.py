"""FastStream adapter: `broker.publish(..., persist=True)` (confirmed, mandatory); the worker is the
`faststream run` CLI with one subscriber that acks after the handler (ack policy REJECT_ON_ERROR)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent / "lib")  # this file's name must not shadow the library

import benchcommon as bc  # noqa: E402

TUNED = ["--workers", "2"]


def produce(args: bc.Args) -> dict[str, object]:
    import faststream_app as app

    async def run() -> dict[str, object]:
        async with app.broker:
            await app.broker.declare_queue(app.queue)

            async def publish(payload: dict[str, str]) -> None:
                await app.broker.publish(payload, queue=app.queue, persist=True)

            timer = bc.Timer()
            if args.phase == "enqueue_sequential":
                for p in bc.payloads(args.phase, args.n):
                    await publish(p)
            elif args.phase == "enqueue_concurrent":

                async def caller(count: int) -> None:
                    for p in bc.payloads(args.phase, count):
                        await publish(p)

                await asyncio.gather(*(caller(c) for c in bc.split(args.n, bc.CALLERS)))
            else:
                # No batch publish API for RabbitMQ: concurrent publishes, confirms awaited together.
                for chunk in bc.chunks(list(bc.payloads(args.phase, args.n)), bc.BATCH):
                    await asyncio.gather(*(publish(p) for p in chunk))
            return timer.result(args.n)

    result, loop = bc.run_async(run)
    return {**result, "loop": loop}


def worker(args: bc.Args) -> None:
    bc.exec_cli(["-m", "faststream", "run", "faststream_app:app", *(TUNED if args.tuned else [])])


if __name__ == "__main__":
    bc.main(produce, worker)
