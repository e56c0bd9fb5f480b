"""celery adapter: `task.delay()` with py-amqp publisher confirms and late acks; the worker is the
`celery worker` CLI (prefork pool, one child per CPU, prefetch multiplier 4)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent / "lib")  # this file's name must not shadow the library

import benchcommon as bc  # noqa: E402

TUNED = ["--pool", "solo", "--prefetch-multiplier", "256", "--without-mingle", "--without-gossip"]


def produce(args: bc.Args) -> dict[str, object]:
    import celery_app as app
    from celery import group

    with app.app.connection_for_write() as connection:
        connection.ensure_connection()
    # A sync client: concurrent callers are threads sharing celery's producer pool; the bulk
    # API, group(...).apply_async(), publishes on one producer, each message confirmed.
    return bc.drive_threads(
        args,
        lambda p: app.send_email.delay(**p),
        lambda chunk: group(app.send_email.s(**p) for p in chunk).apply_async(),
    )


def worker(args: bc.Args) -> None:
    argv = ["-m", "celery", "-A", "celery_app", "worker", "-Q", args.queue]
    bc.exec_cli(argv + (TUNED if args.tuned else []))


if __name__ == "__main__":
    bc.main(produce, worker)
