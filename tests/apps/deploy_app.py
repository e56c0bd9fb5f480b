"""A project for the `deploy` tests: two workers with different settings (names Kubernetes would
refuse as they are), and a schedule, so the fleet has a scheduler too."""

from __future__ import annotations

from nobs_amqp import Project, Schedule, Worker

from .tasks import Job, record

emails = Worker("emails.high", concurrency=20, prefetch=40, time_limit=30)
reports = Worker("Reports_daily", concurrency=2, queue_type="classic", max_priority=5)
nightly = Schedule(record, Job(key="nightly"), worker=reports, cron="0 3 * * *", name="nightly")
project = Project(name="Shop.Backend", workers=[emails, reports], schedules=[nightly], packages=["tests.apps"])
