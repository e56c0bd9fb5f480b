"""How long the broker must wait for a worker's ack: worked out once, when its consumer starts."""

from __future__ import annotations

import math

from .errors import ConfigurationError
from .ratelimit import RATE_WAIT_SECONDS
from .tasks import TaskTable
from .worker import Worker

#: What a delivery's ack timeout allows beyond its task's time limit: to place a retry or dead letter.
ACK_MARGIN_SECONDS = 60.0


def fitting_ack_timeout(
    worker: Worker, tasks: TaskTable, prefetch: int, concurrency: int, fixed: float | None
) -> float | None:
    """How long the broker must wait for an ack here: the longest time limit, times the
    deliveries that may wait for a free slot, plus a margin to settle (and, with rate limits,
    the longest wait for a permit, `RATE_WAIT_SECONDS`, per slot). None without a
    worker time limit (a task may run as long as it likes: the broker's default applies).
    ConfigurationError when the broker's own timeout (`fixed`) is shorter."""
    if worker.time_limit is None:
        return None
    specs = tasks.references.values()
    own = (spec.options.time_limit for spec in specs)
    longest = max([worker.time_limit, *(limit for limit in own if limit is not None)])
    # Any of the project's tasks may come to this queue: one with a rate limit may first wait for its permit.
    limited = worker.rate_limit is not None or any(spec.options.rate_limit for spec in specs)
    wait = RATE_WAIT_SECONDS if limited else 0.0
    needed = (longest + wait) * math.ceil(prefetch / concurrency) + ACK_MARGIN_SECONDS
    if fixed is not None and needed > fixed:
        permit = f" after up to {wait:.0f} s waiting for a rate limit's permit" if wait else ""
        raise ConfigurationError(
            f"worker {worker.name!r}: a delivery may wait {needed:.0f} s for its ack (time limit "
            f"{longest:g} s{permit}, prefetch {prefetch} over concurrency {concurrency}, plus "
            f"{ACK_MARGIN_SECONDS:.0f} s), longer than the broker's consumer timeout of {fixed:.0f} s, after "
            f"which it closes the channel and hands the message out again; raise consumer_timeout in "
            f"rabbitmq.conf and say so with Project(broker_consumer_timeout=...), or use RabbitMQ 3.11.15 or "
            f"newer, where the worker sets its own"
        )
    return needed
