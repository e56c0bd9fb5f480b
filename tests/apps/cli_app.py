"""A project for tests that run `nobs-amqp consume` in a subprocess.

The worker's name and options come from the environment the test sets.
"""

from __future__ import annotations

import os

import tenacity

from nobs_amqp import Project, Worker

worker = Worker(
    os.environ.get("NOBS_TEST_WORKER", "unused"),
    concurrency=int(os.environ.get("NOBS_TEST_CONCURRENCY", "10")),
    delivery_limit=int(os.environ.get("NOBS_TEST_DELIVERY_LIMIT", "10")),
    time_limit=float(os.environ["NOBS_TEST_TIME_LIMIT"]) if os.environ.get("NOBS_TEST_TIME_LIMIT") else None,
    stop=tenacity.stop_after_attempt(int(os.environ.get("NOBS_TEST_MAX_ATTEMPTS", "5"))),
)
project = Project(name="nobs-test", workers=[worker], packages=["tests.apps"])
