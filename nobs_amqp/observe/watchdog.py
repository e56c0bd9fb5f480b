"""`LoopWatchdog` notices an async task that blocks the event loop (a `time.sleep` inside
`async def`) and says which one, so the log explains a dropped connection, so a signal handler
can tell that the loop cannot drain, and so `/livez` can say the loop is stuck."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("nobs_amqp")

WATCHDOG_INTERVAL = 0.25
#: Seconds the loop may not answer before the task that holds it is logged.
BLOCKED_SECONDS = 2.0


class LoopWatchdog:
    """A thread that pings the event loop and logs when a task keeps it from answering."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        labels: Mapping[asyncio.Task[Any], object],
        *,
        threshold: float = BLOCKED_SECONDS,
    ) -> None:
        self._loop = loop
        self._labels = labels
        self._threshold = threshold
        self._beat = time.monotonic()
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="nobs-watchdog", daemon=True)
        #: The task that blocked the loop most recently (a label), for the shutdown path.
        self.culprit: str | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._halt.set()

    def blocked_for(self) -> float:
        """Seconds since the loop last answered (about 0 while it runs freely)."""
        return max(0.0, time.monotonic() - self._beat - WATCHDOG_INTERVAL)

    def _pong(self) -> None:
        self._beat = time.monotonic()

    def _watch(self) -> None:
        reported = False
        started = 0.0
        while not self._halt.wait(WATCHDOG_INTERVAL):
            try:
                self._loop.call_soon_threadsafe(self._pong)
            except RuntimeError:  # the loop is closed
                return
            blocked = self.blocked_for()
            if blocked >= self._threshold and not reported:
                reported, started = True, self._beat
                task = asyncio.current_task(self._loop)
                self.culprit = str(self._labels.get(task, "code outside a task")) if task is not None else "the worker"
                log.error(
                    "event loop blocked for %.1f s by %s: a blocking call inside an async task "
                    "(use a sync task or asyncio.to_thread); heartbeats and other tasks wait",
                    blocked,
                    self.culprit,
                )
            elif reported and blocked < self._threshold:
                reported = False
                log.warning("event loop answers again after %.1f s blocked by %s", self._beat - started, self.culprit)
