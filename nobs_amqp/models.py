"""The names the nobs guide imports from `nobs.models` (and `Schedule`)."""

from .project import Project
from .retry import Reject, Retry
from .schedule import Schedule
from .worker import Worker

__all__ = ["Project", "Reject", "Retry", "Schedule", "Worker"]
