"""dramatiq adapter: `actor.send()` through RabbitmqBroker(confirm_delivery=True); the worker is the
`dramatiq` CLI (default: one process per CPU, 8 threads each, prefetch 2 x threads)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent / "lib")  # this file's name must not shadow the library

import benchcommon as bc  # noqa: E402

TUNED = {"processes": 2, "threads": 16}


def produce(args: bc.Args) -> dict[str, object]:
    import dramatiq
    import dramatiq_app as app

    app.broker.declare_queue(args.queue)
    # A sync client: concurrent callers are threads (the broker keeps a connection per thread);
    # the bulk API, group(...).run(), is one confirmed publish after another.
    result = bc.drive_threads(
        args,
        lambda p: app.send_email.send(**p),
        lambda chunk: dramatiq.group(app.send_email.message(**p) for p in chunk).run(),
    )
    app.broker.close()
    return result


def worker(args: bc.Args) -> None:
    argv = ["-m", "dramatiq", "dramatiq_app", "--queues", args.queue]
    if args.tuned:
        argv += ["--processes", str(TUNED["processes"]), "--threads", str(TUNED["threads"])]
    bc.exec_cli(argv)


if __name__ == "__main__":
    bc.main(produce, worker)
