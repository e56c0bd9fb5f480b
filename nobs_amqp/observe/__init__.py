"""What a project tells about itself: the `Observer` hooks and their implementations (logs,
Prometheus metrics and the health endpoint, OpenTelemetry traces)."""

from .observer import Observer, TaskRun

__all__ = ["Observer", "TaskRun"]
