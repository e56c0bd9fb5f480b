"""nobs_amqp adapter: `await worker.queue()` / `queue_many()`; the worker is the `nobs_amqp consume` CLI."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent / "lib")  # this file's name must not shadow the library

import benchcommon as bc  # noqa: E402

TUNED = {"prefetch": 100, "concurrency": 50}


def produce(args: bc.Args) -> dict[str, object]:
    import nobs_tasks as t

    async def run() -> dict[str, object]:
        async with t.project:
            return await bc.drive_async(
                args,
                lambda p: t.worker.queue(t.send_email, t.SendEmail(**p)),
                lambda chunk: t.worker.queue_many(t.send_email, [t.SendEmail(**p) for p in chunk]),
            )

    result, loop = bc.run_async(run)
    return {**result, "loop": loop}


def worker(args: bc.Args) -> None:
    argv = ["-m", "nobs_amqp", "--app", "nobs_tasks:project", "consume", args.queue]
    if args.tuned:
        argv += [f"--{option}={value}" for option, value in TUNED.items()]
    bc.exec_cli(argv)


if __name__ == "__main__":
    bc.main(produce, worker)
