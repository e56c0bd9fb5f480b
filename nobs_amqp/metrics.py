"""`from nobs_amqp.metrics import PrometheusMetrics`, as documented (the code is in `observe/metrics.py`)."""

from .observe.metrics import PrometheusMetrics

__all__ = ["PrometheusMetrics"]
