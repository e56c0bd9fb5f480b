"""A project for tests that run `nobs-amqp consume` in a subprocess.

The worker's name and options come from the environment the test sets.
"""

from __future__ import annotations

import os

from nobs_amqp import Project, Worker

worker = Worker(
    os.environ.get("NOBS_TEST_WORKER", "unused"),
    concurrency=int(os.environ.get("NOBS_TEST_CONCURRENCY", "10")),
    delivery_limit=int(os.environ.get("NOBS_TEST_DELIVERY_LIMIT", "10")),
)
project = Project(name="nobs-test", workers=[worker], packages=["tests.apps"])
