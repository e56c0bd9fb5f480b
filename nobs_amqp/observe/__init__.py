"""What a project tells about itself: the `Observer` hooks and their implementations (logs,
Prometheus metrics and the health endpoint, OpenTelemetry traces)."""

from .observer import Fate, Observer, Publish, PublishKind, TaskRun

__all__ = ["Fate", "Observer", "Publish", "PublishKind", "TaskRun"]
