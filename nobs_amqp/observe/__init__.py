"""What a project tells about itself: the `Observer` hooks and their implementations (logs,
Prometheus metrics and the health endpoint, OpenTelemetry traces)."""

from .observer import Observer, Publish, PublishKind, TaskRun

__all__ = ["Observer", "Publish", "PublishKind", "TaskRun"]
