"""`nobs_amqp.dlq.peek/find/count/replay/purge`, as documented (the code is in `ops/dlq.py`)."""

from .ops.dlq import count, find, peek, purge, replay

__all__ = ["count", "find", "peek", "purge", "replay"]
