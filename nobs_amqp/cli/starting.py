"""How `nobs-amqp consume` starts and runs: it waits for a broker that does not answer yet (a
broker in maintenance must not crash-loop its workers), and runs several workers as one."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence

from ..consumer import Consumer
from ..errors import BrokerConnectionError
from ..observe.watchdog import LoopWatchdog
from ..project import Project
from ..urls import node_address

log = logging.getLogger("nobs_amqp")

#: Seconds between attempts to reach the broker: doubling from the first, up to the last.
FIRST_RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 30.0
#: At most one warning this often while the broker does not answer.
WARN_EVERY_SECONDS = 30.0


async def open_when_reachable(project: Project, start_timeout: float | None) -> None:
    """Open `project`, trying again with backoff while the broker cannot be reached, for up to
    `start_timeout` seconds (None: until it answers, or a signal ends the process). A broker that
    answers and refuses the login (credentials, TLS certificate) raises at once: waiting does not heal it."""
    started = time.monotonic()
    deadline = math.inf if start_timeout is None else started + start_timeout
    delay, attempts, warned = FIRST_RETRY_SECONDS, 0, -math.inf
    while True:
        try:
            await project.open()
        except BrokerConnectionError as exc:
            attempts += 1
            now = time.monotonic()
            if exc.refused or now + delay > deadline:
                raise
            if now - warned >= WARN_EVERY_SECONDS:
                warned = now
                log.warning(
                    "waiting for the broker at %s (attempt %d, %.0f s so far): %s; retrying every %.0f s at most%s",
                    _where(project),
                    attempts,
                    now - started,
                    exc.detail,
                    MAX_RETRY_SECONDS,
                    "" if start_timeout is None else f", for {start_timeout:g} s (--start-timeout)",
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_SECONDS)
            continue
        if attempts:
            log.info("broker at %s answered after %d attempt(s)", _where(project), attempts + 1)
        return


def _where(project: Project) -> str:
    """The broker's host:port (every node's), never its credentials."""
    try:
        return ", ".join(node_address(url) for url in project.urls)
    except Exception:  # noqa: BLE001 - only for a log line
        return "the broker"


class ConsumerGroup:
    """Several consumers run as one (`consume WORKER WORKER...`): stopped together, and when one
    of them ends by itself (an error, a recycle; with --burst, only those) the others stop too."""

    def __init__(self, consumers: Sequence[Consumer]) -> None:
        self.consumers = list(consumers)
        self.burst = all(consumer.burst for consumer in consumers)

    @property
    def grace_period(self) -> float:
        return max(consumer.grace_period for consumer in self.consumers)

    @property
    def watchdog(self) -> LoopWatchdog | None:
        """One of the loop's watchdogs (they all watch the same loop)."""
        return next((c.watchdog for c in self.consumers if c.watchdog is not None), None)

    @property
    def processed(self) -> int:
        return sum(consumer.processed for consumer in self.consumers)

    @property
    def recycle_reason(self) -> str | None:
        return next((c.recycle_reason for c in self.consumers if c.recycle_reason is not None), None)

    def stop(self) -> None:
        for consumer in self.consumers:
            consumer.stop()

    def force_stop(self) -> None:
        for consumer in self.consumers:
            consumer.force_stop()

    async def run(self) -> None:
        """Run every consumer until all have stopped; raise the first one's error."""
        runs = [asyncio.create_task(c.run(), name=f"nobs-consume-{c.worker.name}") for c in self.consumers]
        pending: set[asyncio.Task[None]] = set(runs)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                failed = any(task.exception() is not None for task in done)
                if failed or not self.burst or self.recycle_reason is not None:
                    self.stop()
        finally:
            for task in runs:
                task.cancel()
            await asyncio.gather(*runs, return_exceptions=True)
        for task in runs:
            task.result()
