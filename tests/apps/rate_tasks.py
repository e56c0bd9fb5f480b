"""Tasks for the rate limit tests: each records when it started, on a clock the test may set
(the memory broker's virtual one)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

from nobs_amqp import task

from .tasks import Job

#: What a start is stamped with: this machine's time unless a test says otherwise.
CLOCK: Callable[[], float] = time.time
STARTS: dict[str, list[float]] = defaultdict(list)


def starts(key: str) -> list[float]:
    return list(STARTS[key])


async def start(job: Job) -> None:
    """Records its start (the worker's rate limit, if any, applies)."""
    STARTS[job.key].append(CLOCK())


@task(rate_limit="5/s")
async def limited(job: Job) -> None:
    """Records its start, at most 5 per second across every worker process (its own limit)."""
    STARTS[job.key].append(CLOCK())


def most_in_a_window(stamps: list[float], seconds: float) -> int:
    """The most starts in any window of `seconds` (each window opening at a start)."""
    ordered = sorted(stamps)
    return max((sum(1 for t in ordered if first <= t < first + seconds) for first in ordered), default=0)
