"""Consuming a worker's queue: run each task, then settle it exactly once.

A message is acked only after whatever replaces it (its retry, or its
dead-letter copy) has been confirmed by the broker, so a crash at any point
loses nothing and at worst runs a task twice. Every delivery ends in exactly one
settle whatever raises, here or in the task; what a publisher put in the message
is validated, never trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from . import message as wire
from .acktimeout import fitting_ack_timeout
from .admission import Admission
from .cancellation import Cancellations
from .context import TaskContext, running
from .copies import Copies
from .errors import (
    TopologyMismatchError,
)
from .message import Reason, printable
from .observe.observer import DRAINING, READY, STOPPED, TaskRun
from .observe.watchdog import LoopWatchdog
from .outcome import (
    DeadLetter,
    Duplicate,
    GivenBack,
    Happened,
    NotPlaced,
    Outcome,
    Raised,
    Refused,
    RejectToDlx,
    Requeue,
    RetryLater,
    Succeeded,
    WorkerFailed,
    decide,
    record,
)
from .ratelimit import Waits, rate_limits
from .replies import Replies
from .retry import Reject, Retry
from .runner import Label, TaskRunner, resident_mb
from .session import Session
from .settled import Identity, SettledAttempts
from .tasks import TaskTable
from .transports.base import Delivery, Subscription
from .worker import Worker

log = logging.getLogger("nobs_amqp")

BURST_POLL_SECONDS = 0.1
#: After a settle failed for a reason other than a lost connection: wait before the message goes back.
REQUEUE_PAUSE_SECONDS = 5.0
#: At shutdown, how long a delay ladder declaration still in progress may take before it is cancelled.
LADDER_SHUTDOWN_SECONDS = 2.0


class Consumer:
    """Consumes one worker's queue until `stop()` (or, in burst mode, until it is empty)."""

    def __init__(
        self,
        session: Session,
        worker: Worker,
        *,
        prefetch: int | None = None,
        concurrency: int | None = None,
        burst: bool = False,
        grace_period: float = 25.0,
        max_memory_mb: float | None = None,
        max_stuck_threads: int | None = None,
        fail_fast: bool = False,
    ) -> None:
        self.session = session
        self.worker = worker
        self.concurrency = concurrency or worker.concurrency
        self.prefetch = prefetch or worker.prefetch or self.concurrency
        self.burst = burst
        self.grace_period = grace_period
        self.max_memory_mb = max_memory_mb
        self.max_stuck_threads = max_stuck_threads
        #: Stop at the first exception a task raises (not Retry or Reject) and raise it from run()
        #: once running tasks are done; its message is settled as usual. For tests (drain).
        self.fail_fast = fail_fast
        #: Why this consumer stopped itself to be replaced by a fresh process (None: it did not).
        self.recycle_reason: str | None = None
        self.processed = 0
        #: Redelivered attempts settled here before (their ack was lost), acked without running again.
        self.duplicates = 0
        self._slots = asyncio.Semaphore(self.concurrency)
        self._running: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._forced = asyncio.Event()
        #: Set once the queue is declared and messages flow.
        self.ready = asyncio.Event()
        self.runner = TaskRunner(worker.name)
        self.watchdog: LoopWatchdog | None = None
        self._tasks: TaskTable | None = None
        self._admission: Admission | None = None
        self._ack_timeout: float | None = None
        #: What the lifespan yielded in this process (tasks read it as `current_task().state`).
        self.state: object = None
        self._subscription: Subscription | None = None
        self._failure: BaseException | None = None
        self._attempts = SettledAttempts()
        self._copies = Copies(session, worker)
        #: The ids cancelled for this worker, as read so far (a worker with `cancellable=True`).
        self.cancellations: Cancellations | None = None
        #: Deliveries waiting for a rate limit's permit, per limit.
        self.rate_waits = Waits(lambda limit, count: session.observers.rate_limited(worker.name, limit, count))
        self._replies = Replies(session, worker)

    @property
    def stalled_on_rate_limits(self) -> bool:
        """Every delivery that holds a concurrency slot here waits for a rate limit's permit."""
        waiting = self.rate_waits.total
        return waiting > 0 and waiting >= min(len(self._running), self.concurrency)

    def stop(self) -> None:
        """Stop taking messages; running tasks get the grace period to finish."""
        if not self._stopping.is_set():
            log.info("worker %s: stopping, %d task(s) running", self.worker.name, len(self._running))
            self._stopping.set()

    def force_stop(self) -> None:
        """Stop now: cancel the running tasks instead of waiting for them; their messages go back to the queue."""
        self.stop()
        if not self._forced.is_set():
            log.warning(
                "worker %s: stopping now; %d running task(s) cancelled, their messages go back to the queue",
                self.worker.name,
                len(self._running),
            )
            self._forced.set()

    async def run(self) -> None:
        self._tasks = self.session.tasks()
        self._ack_timeout = self._fitting_ack_timeout(self._tasks)
        await self.session.declare(self.worker, delayed=False)
        cancelled = Cancellations(self.session, self.worker.name) if self.worker.queue_options.cancellable else None
        self.cancellations = cancelled
        self._admission = Admission(self.session, self.worker, self._tasks, cancelled)
        try:
            if cancelled is not None:
                await cancelled.start()  # every cancellation made so far is known before a message is taken
            # The lifespan opens what tasks share (a pool, a client) before the first message is
            # taken, and closes it after the last one settled.
            async with self.session.resources(f"worker {self.worker.name}", self.worker.lifespan) as state:
                self.state = state
                await self._consume(self._tasks)
        finally:
            if cancelled is not None:
                await cancelled.stop()
        if self._failure is not None:
            raise self._failure

    async def _consume(self, tasks: TaskTable) -> None:
        self.watchdog = LoopWatchdog(asyncio.get_running_loop(), self.runner.labels)
        self.watchdog.start()
        try:
            await self._subscribe()
        except BaseException:
            self.watchdog.stop()
            raise
        # The delay ladder (for retries) is declared while the first messages already run, on the
        # consuming connection (never blocked by a resource alarm: it publishes nothing); a ladder
        # that exists with other arguments stops the worker at once.
        ladder = asyncio.create_task(self.session.declare(self.worker, delayed=True))
        ladder.add_done_callback(self._ladder_declared)
        self.ready.set()
        self.session.observers.consumer_state(self.worker.name, READY)
        log.info(
            "worker %s: consuming %d task(s) (prefetch %d, concurrency %d%s%s)",
            self.worker.name,
            len(tasks),
            self.prefetch,
            self.concurrency,
            ", burst" if self.burst else "",
            ", signed messages only" if self.session.signer is not None else "",
        )
        try:
            if self.burst:
                await self._until_empty()
            else:
                await self._stopping.wait()
        finally:
            await self._drain()
            self.watchdog.stop()
            if not ladder.done() and not self._forced.is_set():
                await asyncio.wait({ladder}, timeout=LADDER_SHUTDOWN_SECONDS)
            ladder.cancel()  # still waiting for an unreachable broker: retries are over, nothing needs it
            await asyncio.wait({ladder})  # its error, if any, was reported by _ladder_declared
            self.session.observers.consumer_state(self.worker.name, STOPPED)

    def _ladder_declared(self, declaring: asyncio.Task[None]) -> None:
        if declaring.cancelled() or declaring.exception() is None:
            return
        error = declaring.exception()
        if isinstance(error, TopologyMismatchError):
            log.error("worker %s: refusing to run: %s", self.worker.name, error)
            self._failure = error
            self.stop()
        else:
            log.error("worker %s: cannot declare the delay ladder yet: %s", self.worker.name, error)

    async def flush(self) -> None:
        """Send acks that wait to be batched (they go out within milliseconds anyway)."""
        if self._subscription is not None:
            await self._subscription.flush()

    async def _subscribe(self) -> None:
        self._subscription = await self.session.transport.consume(
            self.worker.name, self.prefetch, self._on_delivery, ack_timeout=self._ack_timeout
        )

    def _fitting_ack_timeout(self, tasks: TaskTable) -> float | None:
        fixed = self.session.transport.fixed_ack_timeout()
        return fitting_ack_timeout(self.worker, tasks, self.prefetch, self.concurrency, fixed)

    async def _until_empty(self) -> None:
        transport = self.session.transport
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
        self.session.observers.consumer_state(self.worker.name, DRAINING)
        subscription = self._subscription
        assert subscription is not None
        await subscription.cancel()
        if not await self._wait_running(self.grace_period):
            if not self._forced.is_set():
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

    async def _wait_running(self, limit: float | None) -> bool:
        """Wait until no task runs (True), or `limit` seconds passed or force_stop() came (False)."""
        if not self._running:
            return True
        forced = asyncio.ensure_future(self._forced.wait())
        deadline = None if limit is None else asyncio.get_running_loop().time() + limit
        try:
            while self._running and not forced.done():
                left = None if deadline is None else deadline - asyncio.get_running_loop().time()
                if left is not None and left <= 0:
                    break
                await asyncio.wait({*self._running, forced}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        finally:
            forced.cancel()
        return not self._running

    async def _on_delivery(self, delivery: Delivery) -> None:
        task = asyncio.create_task(self._process(delivery))
        self._running.add(task)
        task.add_done_callback(self._settled)
        self.session.observers.holding(self.worker.name, len(self._running))

    def _settled(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self.session.observers.holding(self.worker.name, len(self._running))

    # -- one delivery ------------------------------------------------------------------------

    async def _process(self, delivery: Delivery) -> None:
        async with self._slots:
            if self._stopping.is_set():
                await self._settle(delivery, self._decide(GivenBack()))
                return
            message = delivery.message
            attempt, enqueued_at = message.attempt, message.enqueued_at  # read from headers once
            identity = wire.identity_of(message.message_id, attempt, enqueued_at)
            observers = self.session.observers
            if identity is not None and await self._attempts.copy_of_settled(
                identity, message, redelivered=delivery.redelivered, signer=self.session.signer, queue=self.worker.name
            ):
                self.duplicates += 1
                duplicate = TaskRun(self.worker.name, message.task, message.message_id, attempt)
                outcome = self._decide(Duplicate())
                record(duplicate, outcome)  # before `handling`: tracing makes no span of a duplicate
                with observers.handling(duplicate):
                    try:
                        await self._settle(delivery, outcome)  # its fate is recorded above
                    finally:
                        observers.finished(duplicate)
                return
            run = TaskRun(self.worker.name, message.task, message.message_id, attempt, message.headers)
            started = self._attempts.start(identity)
            try:
                with observers.handling(run):
                    try:
                        await self._settle_one(delivery, run, identity, enqueued_at)
                    finally:
                        observers.finished(run)
            finally:
                if started:
                    self._attempts.end(identity)
            self.processed += 1

    async def _settle_one(
        self, delivery: Delivery, run: TaskRun, identity: Identity | None, enqueued_at: datetime
    ) -> None:
        happened: Happened | None = None
        try:
            happened = await self._execute(delivery, run, enqueued_at)
            outcome = await self._placed(delivery.message, self._decide(happened))
            outcome = await self._answered(delivery.message, happened, outcome)
            if not isinstance(happened, Refused | GivenBack) and not isinstance(outcome, RejectToDlx | Requeue):
                self._attempts.remember(identity)  # only an attempt that verified and ran is remembered
        except asyncio.CancelledError:
            await self._settle(delivery, self._decide(GivenBack()), run)  # shutdown past the grace period
            raise
        except Exception as exc:
            log.exception(
                "task %s id %s: the worker failed to handle it",
                printable(delivery.message.task),
                printable(delivery.message.message_id),
            )
            outcome = await self._answered(delivery.message, happened, await self._worker_failed(delivery, exc, run))
        await self._settle(delivery, outcome, run)

    async def _answered(self, message: wire.Message, happened: Happened | None, outcome: Outcome) -> Outcome:
        """Its copy is placed: queue its chain's next step, or tell the caller awaiting its
        result (`replies.py`); the outcome that holds then."""
        if not self._replies.wanted(message):
            return outcome
        return await self._replies.after(message, happened, outcome)

    def _decide(self, happened: Happened) -> Outcome:
        return decide(happened, self.worker.policy, self.session.now())

    async def _placed(self, message: wire.Message, outcome: Outcome) -> Outcome:
        """Publish the copy `outcome` needs (a retry, a dead letter); the outcome that holds then:
        a retry that cannot be placed is dead-lettered, a dead letter rejected to `W.dlx`."""
        while isinstance(outcome, RetryLater | DeadLetter):
            error = await self._copies.place(message, outcome)
            if error is None:
                return outcome
            outcome = self._decide(NotPlaced(error, outcome))
        return outcome

    async def _settle(self, delivery: Delivery, outcome: Outcome, run: TaskRun | None = None) -> None:
        """The one place a delivery is settled: acked (done, or its copy placed), rejected to the
        broker's dead-lettering, or given back; and its fate written into `run`."""
        if run is not None:
            record(run, outcome)
        match outcome:
            case Requeue():
                await _quietly(delivery.nack(requeue=True))
            case RejectToDlx():
                await _quietly(delivery.nack(requeue=False))  # the broker's own dead-lettering, to W.dlx
            case _:
                await _quietly(delivery.ack())

    async def _execute(self, delivery: Delivery, run: TaskRun, enqueued_at: datetime) -> Happened:
        """Run the delivery's task if it may run; what happened (`enqueued_at`: the message's)."""
        assert self._admission is not None
        if self.cancellations is not None:
            await self.cancellations.current()  # after a lost connection: the stream read again first
        admitted = self._admission.check(delivery, run)
        if isinstance(admitted, Refused):
            return admitted
        message, spec = delivery.message, admitted.spec
        limits = rate_limits(spec.options.rate_limit, self.worker.rate_limit)
        if limits and not await self.session.permits.take(limits, self._stopping, self.rate_waits.of(message)):
            return GivenBack()  # stopping, or waited too long: back to the queue unrun
        if log.isEnabledFor(logging.DEBUG):
            log.debug("task %s id %s attempt %d: start", message.task, printable(message.message_id), run.attempt)
        context = TaskContext(
            message.message_id, message.task, self.worker.name, run.attempt, enqueued_at, admitted.returned, self.state
        )
        self.session.observers.started(run)
        started = time.perf_counter()
        try:
            with running(context):
                value = await self.runner.call(
                    spec.fn,
                    admitted.payload,
                    is_async=spec.is_async,
                    limit=spec.options.time_limit or self.worker.time_limit,
                    label=Label(message.task, message.message_id),
                )
        except Exception as exc:  # noqa: BLE001 - any task failure is settled by the policy
            if self.fail_fast and self._failure is None and not isinstance(exc, Retry | Reject):
                self._failure = exc
                self.stop()
            run.error = exc
            policy = spec.options.policy(self.worker.policy) if spec.options else None
            return Raised(exc, run.attempt, enqueued_at, spec.fn, policy)
        finally:
            run.seconds = time.perf_counter() - started
            self._check_health()
        return Succeeded(value)

    def _check_health(self) -> None:
        """Stop (to be replaced by a fresh process) when tasks leaked memory or left threads stuck."""
        if self.recycle_reason is not None:
            return
        if self.max_stuck_threads is not None and (stuck := self.runner.stuck) >= self.max_stuck_threads:
            self.recycle(f"{stuck} thread(s) stuck in tasks past their time limit")
        elif self.max_memory_mb is not None and (rss := resident_mb()) > self.max_memory_mb:
            self.recycle(f"{rss:.0f} MiB resident, over the limit of {self.max_memory_mb:.0f} MiB")

    def recycle(self, reason: str) -> None:
        log.warning("worker %s: %s; finishing running tasks, then exiting to be replaced", self.worker.name, reason)
        self.recycle_reason = reason
        self.stop()

    async def _worker_failed(self, delivery: Delivery, error: BaseException, run: TaskRun) -> Outcome:
        """The outcome of a delivery whose handling failed in the worker itself: given back if
        the broker went away, else dead-lettered with the error, else rejected to `W.dlx`."""
        outcome = self._decide(WorkerFailed(error))
        if isinstance(outcome, Requeue):
            await asyncio.sleep(REQUEUE_PAUSE_SECONDS)  # no busy loop while the broker is away
            return outcome
        run.error = error
        try:
            return await self._placed(delivery.message, outcome)
        except Exception as exc:  # noqa: BLE001 - the dead letter failed too: the broker's own dead-lettering
            log.warning("id %s: cannot dead-letter it (%s)", printable(delivery.message.message_id), printable(exc))
            return self._decide(NotPlaced(exc, DeadLetter(Reason.WORKER_ERROR, error)))


async def _quietly(settle: object) -> None:
    try:
        await settle  # type: ignore[misc]
    except Exception as exc:  # noqa: BLE001 - the channel is gone; the broker requeues
        log.debug("settle failed: %s", exc)


@asynccontextmanager
async def consuming(session: Session, workers: Sequence[Worker], **options: Any) -> AsyncIterator[list[Consumer]]:
    """Consume `workers` in the background until the block ends (each is ready when it starts);
    then stop taking messages and let running tasks finish (`grace_period`)."""
    consumers = [Consumer(session, worker, **options) for worker in workers]
    runs = [asyncio.create_task(c.run(), name=f"nobs-consume-{c.worker.name}") for c in consumers]
    try:
        for consumer, run in zip(consumers, runs, strict=True):
            ready = asyncio.create_task(consumer.ready.wait())
            await asyncio.wait({run, ready}, return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            if run.done():
                run.result()  # raise what stopped it from starting
        yield consumers
    finally:
        for consumer in consumers:
            consumer.stop()
        for result in await asyncio.gather(*runs, return_exceptions=True):
            if isinstance(result, Exception):
                log.error("consumer stopped with an error: %s", result)
