"""`from nobs_amqp.tracing import Tracing`, as documented (the code is in `observe/tracing.py`)."""

from .observe.tracing import Tracing

__all__ = ["Tracing"]
