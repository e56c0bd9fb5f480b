"""taskiq adapter: `await task.kiq()` through taskiq-aio-pika's AioPikaBroker; the worker is the
`taskiq worker` CLI (default: 2 processes, 100 async tasks each, ack after the result is saved)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent / "lib")  # this file's name must not shadow the library

import benchcommon as bc  # noqa: E402

TUNED: list[str] = []


def produce(args: bc.Args) -> dict[str, object]:
    import taskiq_app as app

    async def run() -> dict[str, object]:
        await app.broker.startup()
        try:
            timer = bc.Timer()
            if args.phase == "enqueue_sequential":
                for p in bc.payloads(args.phase, args.n):
                    await app.send_email.kiq(**p)
            elif args.phase == "enqueue_concurrent":

                async def caller(count: int) -> None:
                    for p in bc.payloads(args.phase, count):
                        await app.send_email.kiq(**p)

                await asyncio.gather(*(caller(c) for c in bc.split(args.n, bc.CALLERS)))
            else:
                for chunk in bc.chunks(list(bc.payloads(args.phase, args.n)), bc.BATCH):
                    await asyncio.gather(*(app.send_email.kiq(**p) for p in chunk))
            return timer.result(args.n)
        finally:
            await app.broker.shutdown()

    result, loop = bc.run_async(run)
    return {**result, "loop": loop}


def worker(args: bc.Args) -> None:
    bc.exec_cli(["-m", "taskiq", "worker", "taskiq_app:broker", *(TUNED if args.tuned else [])])


if __name__ == "__main__":
    bc.main(produce, worker)
