"""Consuming a worker's queue: run each task, then settle it exactly once.

A message is acked only after whatever replaces it (its retry, or its
dead-letter copy) has been confirmed by the broker, so a crash at any point
loses nothing and at worst runs a task twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import orjson
from pydantic import ValidationError

from . import message as wire
from .errors import NobsAmqpError, TaskDefinitionError
from .retry import Ack, DeadLetter, DeliveryLimitExceeded, Outcome, RetryLater, TimeLimitExceeded, decide
from .tasks import TaskSpec, UnknownTaskError, resolve
from .topology import dead_letter_exchange
from .transport import Delivery, Subscription

if TYPE_CHECKING:
    from .project import Project
    from .worker import Worker

log = logging.getLogger("nobs_amqp")

BURST_POLL_SECONDS = 0.1
#: Set by quorum queues on a redelivery: how often the message came back unsettled.
#: RabbitMQ 4.3 counts only explicit failures there and every earlier hand-out in
#: `x-acquired-count`, so the larger of the two says how often a worker got it before.
DELIVERY_COUNTS = ("x-delivery-count", "x-acquired-count")


class Consumer:
    """Consumes one worker's queue until `stop()` (or, in burst mode, until it is empty)."""

    def __init__(
        self,
        project: Project,
        worker: Worker,
        *,
        prefetch: int | None = None,
        concurrency: int | None = None,
        burst: bool = False,
        grace_period: float = 25.0,
    ) -> None:
        self.project = project
        self.worker = worker
        self.concurrency = concurrency or worker.concurrency
        self.prefetch = prefetch or worker.prefetch or self.concurrency
        self.burst = burst
        self.grace_period = grace_period
        self.processed = 0
        self._slots = asyncio.Semaphore(self.concurrency)
        self._running: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        #: Set once the queue is declared and messages flow.
        self.ready = asyncio.Event()
        self._specs: dict[str, TaskSpec] = {}
        self._threads: ThreadPoolExecutor | None = None
        self._subscription: Subscription | None = None

    def stop(self) -> None:
        """Stop taking messages; running tasks get the grace period to finish."""
        if not self._stopping.is_set():
            log.info("worker %s: stopping, %d task(s) running", self.worker.name, len(self._running))
            self._stopping.set()

    async def run(self) -> None:
        await self.project.declare(self.worker, delayed=False)
        # The delay ladder (for retries) is declared while the first messages already run.
        ladder = asyncio.create_task(self.project.declare(self.worker, delayed=True))
        self._threads = ThreadPoolExecutor(self.concurrency, thread_name_prefix=f"nobs-{self.worker.name}")
        await self._subscribe()
        self.ready.set()
        log.info(
            "worker %s: consuming (prefetch %d, concurrency %d%s)",
            self.worker.name,
            self.prefetch,
            self.concurrency,
            ", burst" if self.burst else "",
        )
        try:
            if self.burst:
                await self._until_empty()
            else:
                await self._stopping.wait()
        finally:
            await self._drain()
            try:
                await ladder
            except Exception as exc:  # noqa: BLE001 - retries would have reported it too
                log.error("worker %s: cannot declare the delay ladder: %s", self.worker.name, exc)

    async def flush(self) -> None:
        """Send acks that wait to be batched (they go out within milliseconds anyway)."""
        if self._subscription is not None:
            await self._subscription.flush()

    async def _subscribe(self) -> None:
        self._subscription = await self.project.transport.consume(self.worker.name, self.prefetch, self._on_delivery)

    async def _until_empty(self) -> None:
        transport = self.project.transport
        queue = self.worker.name
        while not self._stopping.is_set():
            if not self._running and await transport.message_count(queue) == 0:
                # Stop deliveries, let what was already sent finish, then look again:
                # only an empty queue with nothing in flight ends a burst.
                assert self._subscription is not None
                await self._subscription.cancel()
                await self._wait_running(None)
                if await transport.message_count(queue) == 0:
                    return
                await self._subscription.close()
                await self._subscribe()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), BURST_POLL_SECONDS)

    async def _drain(self) -> None:
        subscription = self._subscription
        assert subscription is not None
        await subscription.cancel()
        if not await self._wait_running(self.grace_period):
            log.warning(
                "worker %s: %d task(s) still running after %.0f s; their messages go back to the queue",
                self.worker.name,
                len(self._running),
                self.grace_period,
            )
            for task in list(self._running):
                task.cancel()
            await asyncio.gather(*self._running, return_exceptions=True)
        await subscription.close()
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)

    async def _wait_running(self, limit: float | None) -> bool:
        if not self._running:
            return True
        _, pending = await asyncio.wait(set(self._running), timeout=limit)
        return not pending

    async def _on_delivery(self, delivery: Delivery) -> None:
        task = asyncio.create_task(self._process(delivery))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _process(self, delivery: Delivery) -> None:
        async with self._slots:
            if self._stopping.is_set():
                await _quietly(delivery.nack(requeue=True))
                return
            outcome = await self._execute(delivery.message)
            await self._settle(delivery, outcome)
            self.processed += 1

    async def _execute(self, message: wire.Message) -> Outcome:
        returned = max((n for h in DELIVERY_COUNTS if isinstance(n := message.headers.get(h), int)), default=0)
        limit = self.worker.queue_options.delivery_limit
        if limit is not None and returned >= limit:
            return DeadLetter(
                "delivery_limit",
                DeliveryLimitExceeded(
                    f"handed to a worker {returned} times without being settled (the worker was killed, "
                    f"ran out of memory, crashed, or was stopped before it ran it); not running it again"
                ),
            )
        try:
            spec = self._spec(message.task)
        except (UnknownTaskError, TaskDefinitionError) as exc:
            return DeadLetter("unknown_task", exc)
        try:
            payload = spec.decode(message.body)
        except orjson.JSONDecodeError as exc:
            return DeadLetter("decode_error", exc)
        except ValidationError as exc:
            return DeadLetter("validation_error", exc)
        log.debug("task %s id %s attempt %d: start", message.task, message.message_id, message.attempt)
        try:
            await self._call(spec, payload)
        except Exception as exc:  # noqa: BLE001 - any task failure is settled by the policy
            return decide(self.worker.policy, exc, message.attempt, message.enqueued_at, spec.fn)
        return Ack()

    def _spec(self, reference: str) -> TaskSpec:
        spec = self._specs.get(reference)
        if spec is None:
            fn = resolve(reference, self.project.allowlist)
            spec = self._specs[reference] = TaskSpec(fn, reference)
        return spec

    async def _call(self, spec: TaskSpec, payload: object) -> None:
        limit = self.worker.time_limit
        if spec.is_async:
            call = spec.fn(payload)
        else:
            loop = asyncio.get_running_loop()
            call = loop.run_in_executor(self._threads, spec.fn, payload)
        try:
            await asyncio.wait_for(call, limit)
        except TimeoutError as exc:
            raise TimeLimitExceeded(f"task ran longer than its time limit of {limit} s") from exc

    async def _settle(self, delivery: Delivery, outcome: Outcome) -> None:
        message = delivery.message
        try:
            if isinstance(outcome, RetryLater):
                copy = wire.retry_copy(message, outcome.delay)
                await self.project.send(self.worker, copy, outcome.delay)
                log.warning(
                    "task %s id %s attempt %d failed (%s: %s); retry in %.0f s",
                    message.task,
                    message.message_id,
                    message.attempt,
                    type(outcome.error).__name__,
                    outcome.error,
                    outcome.delay,
                )
            elif isinstance(outcome, DeadLetter):
                copy = wire.dead_letter_copy(message, outcome.reason, outcome.error)
                await self.project.transport.publish(dead_letter_exchange(self.worker.name), "", copy)
                log.error(
                    "task %s id %s attempt %d dead-lettered to %s.dlq (%s: %s)",
                    message.task or "?",
                    message.message_id,
                    message.attempt,
                    self.worker.name,
                    outcome.reason,
                    outcome.error,
                )
            await delivery.ack()
        except NobsAmqpError as exc:
            log.error(
                "task %s id %s: cannot settle (%s); it goes back to the queue",
                message.task,
                message.message_id,
                exc,
            )
            await _quietly(delivery.nack(requeue=True))
        except Exception as exc:  # noqa: BLE001 - a lost channel: the broker requeues it
            log.warning(
                "task %s id %s: settle failed (%s); the broker will redeliver it",
                message.task,
                message.message_id,
                exc,
            )


async def _quietly(settle: object) -> None:
    try:
        await settle  # type: ignore[misc]
    except Exception as exc:  # noqa: BLE001 - the channel is gone; the broker requeues
        log.debug("settle failed: %s", exc)
