"""nobs_amqp: background tasks for Python services on RabbitMQ."""

from .context import TaskContext, current_task
from .errors import (
    BrokerConnectionError,
    BrokerUnavailableError,
    ConfigurationError,
    LifespanError,
    NobsAmqpError,
    NoTaskContextError,
    NotFoundError,
    NotInProjectError,
    PayloadTypeError,
    ProjectNotOpenError,
    PublishError,
    TaskDefinitionError,
    TaskNotAllowedError,
    TopologyMismatchError,
    UnroutableError,
)
from .project import Project
from .retry import Reject, Retry, task
from .schedule import Schedule
from .scheduler import Scheduler
from .worker import Worker

__version__ = "0.1.0"

__all__ = [
    "BrokerConnectionError",
    "BrokerUnavailableError",
    "ConfigurationError",
    "LifespanError",
    "NoTaskContextError",
    "NobsAmqpError",
    "NotFoundError",
    "NotInProjectError",
    "PayloadTypeError",
    "Project",
    "ProjectNotOpenError",
    "PublishError",
    "Reject",
    "Retry",
    "Schedule",
    "Scheduler",
    "TaskContext",
    "TaskDefinitionError",
    "TaskNotAllowedError",
    "TopologyMismatchError",
    "UnroutableError",
    "Worker",
    "current_task",
    "task",
]
