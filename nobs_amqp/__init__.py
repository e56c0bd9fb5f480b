"""nobs_amqp: background tasks for Python services on RabbitMQ."""

from typing import TYPE_CHECKING, Any

from .chains import Step
from .context import TaskContext, current_task
from .errors import (
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
    ProjectNotOpenError,
    PublishError,
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
from .retry import Reject, Retry
from .tasks import task
from .worker import Worker

if TYPE_CHECKING:
    from .schedule import Schedule
    from .scheduler import Scheduler

__version__ = "0.1.0"

__all__ = [
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
    "Project",
    "ProjectNotOpenError",
    "Publish",
    "PublishError",
    "PublishUnconfirmedError",
    "Queued",
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
