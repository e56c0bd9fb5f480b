"""FastStream adapter: `broker.publish(..., persist=True)` (confirmed, mandatory); the worker is the
`faststream run` CLI with one subscriber that acks after the handler (ack policy REJECT_ON_ERROR)."""

from __future__ import annotations

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

            # No batch publish API for RabbitMQ: a chunk's publishes are gathered, confirms awaited together.
            return await bc.drive_async(args, publish)

    result, loop = bc.run_async(run)
    return {**result, "loop": loop}


def worker(args: bc.Args) -> None:
    bc.exec_cli(["-m", "faststream", "run", "faststream_app:app", *(TUNED if args.tuned else [])])


if __name__ == "__main__":
    bc.main(produce, worker)
