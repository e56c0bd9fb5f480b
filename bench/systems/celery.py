"""celery adapter: `task.delay()` with py-amqp publisher confirms and late acks; the worker is the
`celery worker` CLI (prefork pool, one child per CPU, prefetch multiplier 4)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent / "lib")  # this file's name must not shadow the library

import benchcommon as bc  # noqa: E402

TUNED = ["--pool", "solo", "--prefetch-multiplier", "256", "--without-mingle", "--without-gossip"]


def produce(args: bc.Args) -> dict[str, object]:
    import celery_app as app
    from celery import group

    with app.app.connection_for_write() as connection:
        connection.ensure_connection()
    timer = bc.Timer()
    if args.phase == "enqueue_sequential":
        for p in bc.payloads(args.phase, args.n):
            app.send_email.delay(**p)
    elif args.phase == "enqueue_concurrent":
        # A sync client: concurrency is threads sharing celery's producer pool.
        def caller(count: int) -> None:
            for p in bc.payloads(args.phase, count):
                app.send_email.delay(**p)

        threads = [threading.Thread(target=caller, args=(c,)) for c in bc.split(args.n, bc.CALLERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        # The bulk API: group(...).apply_async() publishes the tasks on one producer, each confirmed.
        for chunk in bc.chunks(list(bc.payloads(args.phase, args.n)), bc.BATCH):
            group(app.send_email.s(**p) for p in chunk).apply_async()
    return timer.result(args.n)


def worker(args: bc.Args) -> None:
    argv = ["-m", "celery", "-A", "celery_app", "worker", "-Q", args.queue]
    bc.exec_cli(argv + (TUNED if args.tuned else []))


if __name__ == "__main__":
    bc.main(produce, worker)
