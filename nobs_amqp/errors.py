"""Every error nobs_amqp raises: one base class, specific subclasses carrying data.

Two families besides the user's mistakes and the broker's refusals: what a task raises to
steer its own outcome (`retry.Retry`, `retry.Reject`, kept beside the policy that validates
their delay), and why a delivery was not run or failed in the
worker (`TaskFailure` and its subclasses), whose class name an operator reads as the
`x-nobs-error-type` of a dead letter.
"""

from __future__ import annotations


class NobsAmqpError(Exception):
    """Base class of every error raised by nobs_amqp."""


class ConfigurationError(NobsAmqpError):
    """A setting, worker option or project definition is invalid."""


class TaskDefinitionError(NobsAmqpError):
    """A function cannot be used as a task (a worker process could not import or call it)."""

    def __init__(self, task: object, why: str) -> None:
        self.task = task
        self.why = why
        name = getattr(task, "__qualname__", repr(task))
        super().__init__(f"{name} cannot be queued: {why}")


class TaskNotAllowedError(NobsAmqpError):
    """A task is outside what the project allows workers to import."""

    def __init__(self, reference: str, project: str) -> None:
        self.reference = reference
        self.project = project
        super().__init__(
            f"task {reference} is outside project {project!r}: workers only run functions "
            f"from the project's packages; add its package to Project(packages=[...]) "
            f"or the function to Project(tasks=[...])"
        )


class PayloadTypeError(NobsAmqpError):
    """A payload does not match the annotation of the task's parameter."""

    def __init__(self, reference: str, expected: object, detail: str) -> None:
        self.reference = reference
        self.expected = expected
        self.detail = detail
        super().__init__(f"payload for {reference} does not match {_type_name(expected)}: {detail}")


class NotInProjectError(NobsAmqpError):
    """A worker is used before it was added to a Project."""

    def __init__(self, worker: str) -> None:
        self.worker = worker
        super().__init__(f"worker {worker!r} is in no project: add it with Project(name=..., workers=[...])")


class ProjectNotOpenError(NobsAmqpError):
    """A project is used for I/O before its connection was opened."""

    def __init__(self, project: str) -> None:
        self.project = project
        super().__init__(
            f"project {project!r} is not open: wrap the code in `async with project:` "
            f"or use FastAPI(lifespan=project.lifespan)"
        )


class BrokerConnectionError(NobsAmqpError):
    """The broker cannot be reached or refused the connection. `refused`: it answered and refused
    the login (credentials, vhost, permissions, TLS certificate), which waiting does not heal."""

    def __init__(self, where: str, detail: str, *, refused: bool = False) -> None:
        self.where = where
        self.detail = detail
        self.refused = refused
        super().__init__(
            f"cannot connect to {where}: {detail}; check that RabbitMQ runs there "
            f"and that NOBS_AMQP_URL (or Project(url=...)) is right"
        )


class PublishError(NobsAmqpError):
    """The broker did not take a message: not sent, refused or returned, unless `maybe_sent`."""

    #: The message may be in the queue all the same (`PublishUnconfirmedError`): queueing it
    #: again may run the task twice.
    maybe_sent = False

    def __init__(self, destination: str, detail: str) -> None:
        self.destination = destination
        self.detail = detail
        #: The id of the message that was not taken (set when it had one).
        self.message_id: str | None = None
        super().__init__(f"message to {destination!r} was not confirmed: {detail}")


class UnroutableError(PublishError):
    """The broker returned a mandatory message: no queue was bound to receive it."""

    def __init__(self, destination: str) -> None:
        super().__init__(
            destination,
            "no queue received it (returned as unroutable): a queue or binding is missing; "
            "`nobs-amqp topology diff` shows which, `nobs-amqp topology apply` declares it",
        )


class BrokerUnavailableError(PublishError):
    """The broker stayed unreachable (or refused messages) for the whole publish timeout: nothing was sent."""


class BrokerBlockedError(BrokerUnavailableError):
    """The broker blocked publishing (a memory or disk alarm) for the whole publish timeout: nothing was sent."""

    def __init__(self, destination: str, reason: str, timeout: float) -> None:
        self.reason = reason
        super().__init__(
            destination,
            f"the broker blocked publishing ({reason}) for all of publish_timeout ({timeout:.0f} s), so it was "
            f"not sent: a resource alarm is on (`rabbitmq-diagnostics alarms` says which); queue it again once "
            f"it clears",
        )


class PublishUnconfirmedError(PublishError):
    """A message was sent and the broker did not confirm it in time: it may be in the queue or not."""

    maybe_sent = True

    def __init__(self, destination: str, message_id: str, why: str, timeout: float) -> None:
        self.why = why
        super().__init__(
            destination,
            f"it was sent, and {why} before the broker confirmed it within publish_timeout ({timeout:.0f} s), "
            f"so it may be in the queue: queueing it again may run the task twice (its message id is "
            f"{message_id}; a task keyed on it runs once)",
        )
        self.message_id = message_id


class PublishInterruptedError(PublishError):
    """A sync producer's call stopped waiting for its I/O thread (timeout, close): it may be in the queue or not."""

    maybe_sent = True

    def __init__(self, destination: str, why: str) -> None:
        self.why = why
        super().__init__(
            destination,
            f"the sync producer {why}, so it may be in the queue or not: queueing it again may run the task "
            f"twice (a task keyed on its message id runs once)",
        )


class ProducerClosedError(NobsAmqpError):
    """A sync producer was used after its `close()`."""

    def __init__(self, project: str) -> None:
        self.project = project
        super().__init__(f"the sync producer of project {project!r} is closed: get an open one with `project.sync()`")


class BlockingCallError(NobsAmqpError):
    """A sync producer was called inside a running event loop, which its wait would block."""

    def __init__(self, call: str) -> None:
        self.call = call
        super().__init__(
            f"{call} blocks, and this thread runs an event loop (an async route?): "
            f"use `await worker.queue(fn, payload)` there instead"
        )


class MessageTooLargeError(PublishError):
    """A message's body is larger than the broker takes (its `max_message_size`): nothing was sent."""

    def __init__(self, destination: str, size: int, limit: int, source: str) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            destination,
            f"its body has {size:,} bytes, more than the broker takes ({limit:,} bytes: {source}), so it was "
            f"not sent: queue a reference to the data (a URL, an object-store key) instead, or raise the "
            f"broker's max_message_size and Project(max_message_size=...) together",
        )


class NotFoundError(PublishError):
    """The exchange a message was published to does not exist (AMQP 404)."""

    def __init__(self, destination: str, detail: str) -> None:
        super().__init__(
            destination,
            f"the broker answered 404, it does not exist ({detail}); run `nobs-amqp topology apply` "
            f"or start a worker to declare it",
        )


class TopologyMismatchError(NobsAmqpError):
    """A queue or exchange exists on the broker with other arguments than declared."""

    def __init__(self, kind: str, name: str, vhost: str, difference: str) -> None:
        self.kind = kind
        self.name = name
        self.vhost = vhost
        self.difference = difference
        fix = (
            f"rabbitmqctl delete_queue {name} -p {vhost}"
            if kind == "queue"
            else f"rabbitmqadmin -V {vhost} delete exchange name={name}"
        )
        super().__init__(
            f"{kind} {name!r} in vhost {vhost!r} exists with other arguments ({difference}); "
            f"nothing was changed. Either make the Worker options match it, or move its "
            f"messages away (a shovel in the management UI does it), delete it "
            f"(`{fix}`) and start the worker again to recreate it"
        )


class MemoryBrokerLoopError(ConfigurationError):
    """A memory:// broker was used from an event loop other than the one consuming it."""

    def __init__(self, broker: str) -> None:
        self.broker = broker
        super().__init__(
            f"memory broker {broker!r} is being consumed on another event loop (another thread): it lives on "
            f"one loop at a time; queue first and consume after (`testing.drain_sync()` from sync code), or queue "
            f"with `await worker.queue(...)` on the consuming loop"
        )


class NoTaskContextError(NobsAmqpError):
    """`current_task()` was called outside a task a worker runs."""


class LifespanError(NobsAmqpError):
    """A worker's (or project's) lifespan failed to start: the worker takes no message."""

    def __init__(self, owner: str, error: BaseException) -> None:
        self.owner = owner
        self.error = error
        super().__init__(
            f"the lifespan of {owner} failed to start ({type(error).__name__}: {error}); "
            f"no message was taken: fix what it opens (a database, a client) and start the worker again"
        )


class MetricsPortError(ConfigurationError):
    """The metrics and health endpoint cannot listen where it was asked to (a port in use, say)."""

    def __init__(self, host: str, port: int, detail: str, fix: str) -> None:
        self.host = host
        self.port = port
        self.detail = detail
        super().__init__(f"cannot serve metrics on {host}:{port}: {detail}; {fix}")


class TaskFailure(NobsAmqpError):  # noqa: N818 - a family of reasons, not one error
    """Why a delivery was not run, or failed outside the task's own code (read in the DLQ)."""


class TimeLimitExceeded(TaskFailure):
    """A task ran longer than its worker's time limit."""


class TaskAborted(TaskFailure):
    """A task raised SystemExit, KeyboardInterrupt or another BaseException: it failed, the worker goes on."""


class DeliveryLimitExceeded(TaskFailure):
    """A message came back more often than its queue's delivery limit: its worker kept dying."""


class UnknownTaskError(TaskFailure):
    """A message names no task this worker runs; nothing was imported or called."""


class ForeignTaskError(UnknownTaskError):
    """Another project's message reached this worker: the two share a vhost and a worker name."""


class UndecodableMessageError(TaskFailure):
    """Some of a message's properties, or its body, could not be decoded."""


class BadSignatureError(TaskFailure):
    """A message is unsigned or its signature does not match the project's keys."""


class RetryNotPlacedError(TaskFailure):
    """A task failed and its retry could not be published: it was dead-lettered instead."""


class TaskExpiredError(TaskFailure):
    """A message was taken after the time its `queue(..., expires=...)` gave: it was not run."""


class TaskCancelledError(TaskFailure):
    """A message's id was cancelled with `Worker.cancel()` before a worker took it: it was not run."""


def _type_name(tp: object) -> str:
    return getattr(tp, "__qualname__", None) or repr(tp)


class ResultError(NobsAmqpError):
    """A task's result cannot be had (the base of the errors `Queued.result()` raises)."""


class ResultNotRequestedError(ResultError):
    """`result()` on a task queued without `result=True`: no reply was asked for."""

    def __init__(self, message_id: str, *, duplicate: bool = False) -> None:
        self.message_id = message_id
        if duplicate:
            super().__init__(
                f"message {message_id} was not queued (the same id was queued within its unique window): "
                f"only the queue() that sent it can await its result"
            )
            return
        super().__init__(
            f"message {message_id} was queued without asking for its result: pass result=True to queue() "
            f"(or queue_many()) to await it"
        )


class TaskFailedError(ResultError):
    """The task failed for good (dead-lettered): `reason`, the error's type and message say why."""

    def __init__(
        self,
        task: str,
        message_id: str,
        reason: str,
        error_type: str | None,
        error_message: str | None,
        *,
        step: str | None = None,
    ) -> None:
        self.task = task
        self.message_id = message_id
        self.reason = reason
        self.error_type = error_type
        self.error_message = error_message
        #: In a chain: which step failed ("2 of 3"); None outside a chain.
        self.step = step
        what = f"{error_type}: {error_message}" if error_type else (error_message or "no error message")
        where = f" (step {step} of its chain)" if step else ""
        super().__init__(f"task {task}{where} failed for good ({reason}): {what}; message id {message_id}")


class ResultTimeoutError(ResultError, TimeoutError):
    """No result came within the timeout `result()` was given (the task may still run)."""

    def __init__(self, message_id: str, timeout: float | None) -> None:
        self.message_id = message_id
        self.timeout = timeout
        super().__init__(
            f"no result for message {message_id} within {timeout} s: the task has not finished (or is "
            f"waiting to be retried); await result() with a longer timeout"
        )


class ResultLostError(ResultError):
    """The connection that would receive the result was lost: its reply cannot come (the task may run)."""

    def __init__(self, message_id: str, why: str) -> None:
        self.message_id = message_id
        self.why = why
        super().__init__(
            f"the result of message {message_id} is lost: {why}; the task itself is not (it runs, or ran); "
            f"results are delivered only to the connection that queued the task"
        )


class ResultUnreadableError(ResultError):
    """The task succeeded, but its return value could not be sent as JSON or read as its annotation."""

    def __init__(self, task: str, message_id: str, detail: str) -> None:
        self.task = task
        self.message_id = message_id
        self.detail = detail
        super().__init__(f"task {task} succeeded but its result cannot be read: {detail}; message id {message_id}")


class ChainError(ConfigurationError):
    """A chain cannot be queued as given (a step's worker, task or payload)."""
