"""A project with a schedule every second, for tests that run `nobs-amqp schedule` in subprocesses.

Its name and its worker's come from the environment the test sets (NOBS_TEST_PROJECT,
NOBS_TEST_WORKER), so each test has its own lease and state queue in the session's vhost.
"""

from __future__ import annotations

import os

from nobs_amqp import Project, Schedule, Worker

from .tasks import Job, record

worker = Worker(os.environ.get("NOBS_TEST_WORKER", "unused"))
every_second = Schedule(record, Job(key="tick"), worker=worker, every=1, name="every-second")
project = Project(
    name=os.environ.get("NOBS_TEST_PROJECT", "nobs-test-schedules"),
    workers=[worker],
    schedules=[every_second],
    packages=["tests.apps"],
)
