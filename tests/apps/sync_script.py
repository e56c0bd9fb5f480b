"""A plain script that queues through the sync producer and exits without closing it (atexit does)."""

from __future__ import annotations

import atexit
import os
import threading

from nobs_amqp import Project, Worker
from tests.apps import tasks

worker = Worker(os.environ.get("SYNC_WORKER", "sync-script"))
project = Project("nobs-test", [worker], packages=["tests"])
producer = project.sync()


def _report() -> None:
    """Registered before the producer opens, so it runs after the producer's own atexit close (LIFO)."""
    io = [thread.name for thread in threading.enumerate() if thread.name.startswith("nobs-amqp sync")]
    print("closed" if producer.closed and not io else f"left open: {io}")


if __name__ == "__main__":
    atexit.register(_report)
    for n in range(int(os.environ.get("SYNC_COUNT", "3"))):
        print(producer.queue(worker, tasks.record, tasks.Job(key=f"script-{n}")))
