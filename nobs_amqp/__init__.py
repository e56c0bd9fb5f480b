"""nobs_amqp: background tasks for Python services on RabbitMQ."""

from .errors import (
    BrokerConnectionError,
    BrokerUnavailableError,
    ConfigurationError,
    NobsAmqpError,
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
from .retry import Reject, Retry
from .schedule import Schedule
from .scheduler import Scheduler
from .worker import Worker

__version__ = "0.1.0"

__all__ = [
    "BrokerConnectionError",
    "BrokerUnavailableError",
    "ConfigurationError",
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
    "TaskDefinitionError",
    "TaskNotAllowedError",
    "TopologyMismatchError",
    "UnroutableError",
    "Worker",
]
