"""taskiq adapter: `await task.kiq()` through taskiq-aio-pika's AioPikaBroker; the worker is the
`taskiq worker` CLI (default: 2 processes, 100 async tasks each, ack after the result is saved)."""

from __future__ import annotations

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
            return await bc.drive_async(args, lambda p: app.send_email.kiq(**p))
        finally:
            await app.broker.shutdown()

    result, loop = bc.run_async(run)
    return {**result, "loop": loop}


def worker(args: bc.Args) -> None:
    bc.exec_cli(["-m", "taskiq", "worker", "taskiq_app:broker", *(TUNED if args.tuned else [])])


if __name__ == "__main__":
    bc.main(produce, worker)
