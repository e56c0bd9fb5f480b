"""nobs_amqp adapter: `await worker.queue()` / `queue_many()`; the worker is the `nobs_amqp consume` CLI."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent / "lib")  # this file's name must not shadow the library

import benchcommon as bc  # noqa: E402

TUNED = {"prefetch": 100, "concurrency": 50}


def produce(args: bc.Args) -> dict[str, object]:
    import nobs_tasks as t

    async def run() -> dict[str, object]:
        async with t.project:
            timer = bc.Timer()
            if args.phase == "enqueue_sequential":
                for p in bc.payloads(args.phase, args.n):
                    await t.worker.queue(t.send_email, t.SendEmail(**p))
            elif args.phase == "enqueue_concurrent":

                async def caller(count: int) -> None:
                    for p in bc.payloads(args.phase, count):
                        await t.worker.queue(t.send_email, t.SendEmail(**p))

                await asyncio.gather(*(caller(c) for c in bc.split(args.n, bc.CALLERS)))
            else:
                for chunk in bc.chunks(list(bc.payloads(args.phase, args.n)), bc.BATCH):
                    await t.worker.queue_many(t.send_email, [t.SendEmail(**p) for p in chunk])
            return timer.result(args.n)

    result, loop = bc.run_async(run)
    return {**result, "loop": loop}


def worker(args: bc.Args) -> None:
    argv = ["-m", "nobs_amqp", "--app", "nobs_tasks:project", "consume", args.queue]
    if args.tuned:
        argv += [f"--{option}={value}" for option, value in TUNED.items()]
    bc.exec_cli(argv)


if __name__ == "__main__":
    bc.main(produce, worker)
