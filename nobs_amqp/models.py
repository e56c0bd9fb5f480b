"""The names the nobs guide imports from `nobs.models`."""

from .project import Project
from .retry import Reject, Retry
from .worker import Worker

__all__ = ["Project", "Reject", "Retry", "Worker"]
