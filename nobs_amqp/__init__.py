"""nobs_amqp: background tasks for Python services on RabbitMQ."""

from typing import TYPE_CHECKING, Any

from .chains import Step
from .context import TaskContext, current_task
from .errors import (
    BlockingCallError,
    BrokerBlockedError,
    BrokerConnectionError,
    BrokerUnavailableError,
    ChainError,
    ConfigurationError,
    LifespanError,
    MessageTooLargeError,
    NobsAmqpError,
    NoTaskContextError,
    NotFoundError,
    NotInProjectError,
    PayloadTypeError,
    ProducerClosedError,
    ProjectNotOpenError,
    PublishError,
    PublishInterruptedError,
    PublishUnconfirmedError,
    ResultError,
    ResultLostError,
    ResultNotRequestedError,
    ResultTimeoutError,
    ResultUnreadableError,
    TaskDefinitionError,
    TaskFailedError,
    TaskNotAllowedError,
    TopologyMismatchError,
    UnroutableError,
)
from .handle import Queued, gather_results
from .observe import Fate, Observer, Publish, TaskRun
from .project import Project
from .ratelimit import RateLimit
from .retry import Reject, Retry
from .sync import SyncProducer
from .tasks import task
from .worker import Worker, was_queued

if TYPE_CHECKING:
    from .schedule import Schedule
    from .scheduler import Scheduler

__version__ = "0.1.0"

__all__ = [
    "BlockingCallError",
    "BrokerBlockedError",
    "BrokerConnectionError",
    "BrokerUnavailableError",
    "ChainError",
    "ConfigurationError",
    "Fate",
    "LifespanError",
    "MessageTooLargeError",
    "NoTaskContextError",
    "NobsAmqpError",
    "NotFoundError",
    "NotInProjectError",
    "Observer",
    "PayloadTypeError",
    "ProducerClosedError",
    "Project",
    "ProjectNotOpenError",
    "Publish",
    "PublishError",
    "PublishInterruptedError",
    "PublishUnconfirmedError",
    "Queued",
    "RateLimit",
    "Reject",
    "ResultError",
    "ResultLostError",
    "ResultNotRequestedError",
    "ResultTimeoutError",
    "ResultUnreadableError",
    "Retry",
    "Schedule",
    "Scheduler",
    "Step",
    "SyncProducer",
    "TaskContext",
    "TaskDefinitionError",
    "TaskFailedError",
    "TaskNotAllowedError",
    "TaskRun",
    "TopologyMismatchError",
    "UnroutableError",
    "Worker",
    "current_task",
    "gather_results",
    "task",
    "was_queued",
]


def __getattr__(name: str) -> Any:
    """Schedule and Scheduler, imported when first named: a worker without schedules never loads them."""
    if name == "Schedule":
        from .schedule import Schedule

        return Schedule
    if name == "Scheduler":
        from .scheduler import Scheduler

        return Scheduler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
