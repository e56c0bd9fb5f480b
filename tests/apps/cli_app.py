"""A project for tests that run `nobs-amqp consume` in a subprocess.

The worker's name and options come from the environment the test sets.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import tenacity

from nobs_amqp import Project, Worker


@asynccontextmanager
async def resources() -> AsyncIterator[dict[str, Any]]:
    """With NOBS_TEST_LIFESPAN_DIR set: leaves open.<pid> and close.<pid> there, yields the pid."""
    folder = Path(os.environ["NOBS_TEST_LIFESPAN_DIR"])
    (folder / f"open.{os.getpid()}").touch()
    try:
        yield {"pid": os.getpid()}
    finally:
        (folder / f"close.{os.getpid()}").touch()


worker = Worker(
    os.environ.get("NOBS_TEST_WORKER", "unused"),
    concurrency=int(os.environ.get("NOBS_TEST_CONCURRENCY", "10")),
    delivery_limit=int(os.environ.get("NOBS_TEST_DELIVERY_LIMIT", "10")),
    time_limit=float(os.environ["NOBS_TEST_TIME_LIMIT"]) if os.environ.get("NOBS_TEST_TIME_LIMIT") else None,
    stop=tenacity.stop_after_attempt(int(os.environ.get("NOBS_TEST_MAX_ATTEMPTS", "5"))),
    lifespan=resources if os.environ.get("NOBS_TEST_LIFESPAN_DIR") else None,
    cancellable=bool(os.environ.get("NOBS_TEST_CANCELLABLE")),
    rate_limit=os.environ.get("NOBS_TEST_RATE_LIMIT") or None,
)
project = Project(name="nobs-test", workers=[worker], packages=["tests.apps"])
