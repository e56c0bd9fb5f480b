"""A project with two workers for `nobs-amqp consume A B` in a subprocess: their names are
NOBS_TEST_WORKER with `.mail` and `.hooks` after it."""

from __future__ import annotations

import os

from nobs_amqp import Project, Worker

PREFIX = os.environ.get("NOBS_TEST_WORKER", "unused")
mail = Worker(f"{PREFIX}.mail", concurrency=2)
hooks = Worker(f"{PREFIX}.hooks", concurrency=3)
project = Project(name="nobs-test", workers=[mail, hooks], packages=["tests.apps"])
