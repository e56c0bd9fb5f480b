"""Tasks for the rate limit tests: each records when it started, on a clock the test may set
(the memory broker's virtual one)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

from nobs_amqp import RateLimit
from nobs_amqp.tasks import TaskOptions

from .tasks import Job

#: What a start is stamped with: this machine's time unless a test says otherwise.
CLOCK: Callable[[], float] = time.time
STARTS: dict[str, list[float]] = defaultdict(list)


def starts(key: str) -> list[float]:
    return list(STARTS[key])


async def start(job: Job) -> None:
    """Records its start (the worker's rate limit, if any, applies)."""
    STARTS[job.key].append(CLOCK())


async def limited(job: Job) -> None:
    """Records its start; a test gives it a rate limit of its own (`LIMITED`) while it runs: every
    project of the test suite loads this module, and a task with a rate limit makes each of their
    workers allow for a wait for its permit in their ack timeout."""
    STARTS[job.key].append(CLOCK())


#: What `@task(rate_limit="5/s")` would give `limited`.
LIMITED = TaskOptions(rate_limit=RateLimit(f"{__name__}.limited", 5))


def most_in_a_window(stamps: list[float], seconds: float) -> int:
    """The most starts in any window of `seconds` (each window opening at a start)."""
    ordered = sorted(stamps)
    return max((sum(1 for t in ordered if first <= t < first + seconds) for first in ordered), default=0)
