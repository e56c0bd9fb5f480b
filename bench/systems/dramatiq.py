"""dramatiq adapter: `actor.send()` through RabbitmqBroker(confirm_delivery=True); the worker is the
`dramatiq` CLI (default: one process per CPU, 8 threads each, prefetch 2 x threads)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent / "lib")  # this file's name must not shadow the library

import benchcommon as bc  # noqa: E402

TUNED = {"processes": 2, "threads": 16}


def produce(args: bc.Args) -> dict[str, object]:
    import dramatiq
    import dramatiq_app as app

    app.broker.declare_queue(args.queue)
    timer = bc.Timer()
    if args.phase == "enqueue_sequential":
        for p in bc.payloads(args.phase, args.n):
            app.send_email.send(**p)
    elif args.phase == "enqueue_concurrent":
        # A sync client: concurrency is threads (the broker keeps a connection per thread).
        def caller(count: int) -> None:
            for p in bc.payloads(args.phase, count):
                app.send_email.send(**p)

        threads = [threading.Thread(target=caller, args=(c,)) for c in bc.split(args.n, bc.CALLERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        # The bulk API is group(...).run(): one confirmed publish after another.
        for chunk in bc.chunks(list(bc.payloads(args.phase, args.n)), bc.BATCH):
            dramatiq.group(app.send_email.message(**p) for p in chunk).run()
    result = timer.result(args.n)
    app.broker.close()
    return result


def worker(args: bc.Args) -> None:
    argv = ["-m", "dramatiq", "dramatiq_app", "--queues", args.queue]
    if args.tuned:
        argv += ["--processes", str(TUNED["processes"]), "--threads", str(TUNED["threads"])]
    bc.exec_cli(argv)


if __name__ == "__main__":
    bc.main(produce, worker)
