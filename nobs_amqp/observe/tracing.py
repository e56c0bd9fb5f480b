"""Traces: OpenTelemetry spans for publishing and processing, with the W3C trace context in
the message headers, so that a task's spans join the trace of whatever queued it.

`queue()` (and every retry or dead-letter copy a worker publishes) runs in a PRODUCER span
"publish <worker>" and sends the context in the headers (`traceparent`, `tracestate`, through the
configured propagator); a worker handles each delivery in a CONSUMER span "process <worker>",
the child of that context, and runs the task inside it (a sync task in its thread too). A retry
is a new "process" span in the same trace: its copy was published from the failed attempt's
span. Names and attributes follow OpenTelemetry's messaging conventions for RabbitMQ.

Nothing here imports OpenTelemetry until a `Tracing` is made: a project adds one when it opens
if `opentelemetry` can be imported (`pip install nobs_amqp[otel]`), unless it was made with
`tracing=False`, OTEL_SDK_DISABLED is true, or one was passed in `observers`. Spans go to the
tracer provider the application configured (none: OpenTelemetry's no-op, at next to no cost).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from ..message import ETA, Message, printable
from .observer import Fate, Observer, Publish, PublishKind, TaskRun

if TYPE_CHECKING:
    from opentelemetry.propagators.textmap import Getter
    from opentelemetry.trace import Span, TracerProvider

log = logging.getLogger("nobs_amqp")

INSTRUMENTATION = "nobs_amqp"
#: Our own attributes, beside the messaging conventions' ones.
TASK = "nobs_amqp.task"
ATTEMPT_ATTRIBUTE = "nobs_amqp.attempt"
OUTCOME = "nobs_amqp.outcome"
REASON_ATTRIBUTE = "nobs_amqp.reason"
RETRY_DELAY = "nobs_amqp.retry_delay"
ETA_ATTRIBUTE = "nobs_amqp.eta"
#: A header value longer than this is not trace context (W3C caps tracestate at 512 characters).
MAX_CONTEXT_HEADER = 1024


class Tracing(Observer):
    """Spans for publishing and processing messages, through `tracer_provider` (default: the
    global one the application set with `opentelemetry.trace.set_tracer_provider`)."""

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        from opentelemetry import propagate, trace

        self._trace = trace
        self._propagate = propagate
        self._tracer = trace.get_tracer(INSTRUMENTATION, tracer_provider=tracer_provider)
        self._headers = _headers_getter()

    def __repr__(self) -> str:
        return "Tracing()"

    @contextlib.contextmanager
    def publishing(self, publish: Publish) -> Iterator[Message]:
        message, dead_letter = publish.message, publish.kind is PublishKind.DEAD_LETTER
        destination = publish.exchange if dead_letter else publish.worker
        attributes = _attributes("send", "publish", destination, message.message_id, message.task, message.attempt)
        if ETA in message.headers:  # through the delay ladder, whose routing key says the delay
            attributes[ETA_ATTRIBUTE] = str(message.headers[ETA])
        elif not dead_letter:  # the default exchange, straight to the worker's queue
            attributes["messaging.rabbitmq.destination.routing_key"] = publish.routing_key
        with self._tracer.start_as_current_span(
            f"publish {destination}",
            kind=self._trace.SpanKind.PRODUCER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            headers = dict(message.headers)
            self._propagate.inject(headers)
            try:
                yield replace(message, headers=headers)
            except Exception as exc:
                self._failed(span, exc)
                raise

    @contextlib.contextmanager
    def handling(self, run: TaskRun) -> Iterator[None]:
        if run.outcome == Fate.DUPLICATE:  # acked unrun: nothing happened that is worth a span
            yield
            return
        parent = self._propagate.extract(run.headers, getter=self._headers)
        with self._tracer.start_as_current_span(
            f"process {run.worker}",
            context=parent,
            kind=self._trace.SpanKind.CONSUMER,
            attributes=_attributes("process", "process", run.worker, run.message_id, run.task, run.attempt),
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield
            finally:
                self._ended(span, run)

    def _ended(self, span: Span, run: TaskRun) -> None:
        """How the delivery ended: the outcome, and an error status with the exception."""
        span.set_attribute(OUTCOME, run.outcome or "unsettled")
        if run.reason is not None:
            span.set_attribute(REASON_ATTRIBUTE, run.reason)
        if run.delay is not None:
            span.set_attribute(RETRY_DELAY, run.delay)
        if run.error is not None:
            self._failed(span, run.error)
        elif run.reason is not None:  # dead-lettered with no exception to show
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, run.reason))

    def _failed(self, span: Span, error: BaseException) -> None:
        span.record_exception(error)
        span.set_attribute("error.type", f"{type(error).__module__}.{type(error).__qualname__}")
        description = f"{type(error).__name__}: {printable(error, 200)}"
        span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, description))


def _attributes(
    kind: str, operation: str, destination: str, message_id: str, task: str, attempt: int
) -> dict[str, str | int]:
    return {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": kind,
        "messaging.operation.name": operation,
        "messaging.destination.name": destination,
        "messaging.message.id": printable(message_id, 255),
        TASK: printable(task, 255),
        ATTEMPT_ATTRIBUTE: attempt,
    }


def _headers_getter() -> Getter[Mapping[str, object]]:
    """A propagation getter for message headers: strings only, of a sane length (a header is
    whatever a publisher wrote)."""
    from opentelemetry.propagators.textmap import Getter

    class Headers(Getter[Mapping[str, object]]):
        def get(self, carrier: Mapping[str, object], key: str) -> list[str] | None:
            value = carrier.get(key)
            return [value] if isinstance(value, str) and len(value) <= MAX_CONTEXT_HEADER else None

        def keys(self, carrier: Mapping[str, object]) -> list[str]:
            return list(carrier)

    return Headers()


def automatic(observers: Sequence[Observer], enabled: bool = True) -> list[Observer]:
    """The tracing a project adds when it opens: a `Tracing` if OpenTelemetry can be imported
    and nothing turned it off; none if `observers` has one already."""
    if not enabled or any(isinstance(o, Tracing) for o in observers):
        return []
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    try:
        if importlib.util.find_spec("opentelemetry") is None:
            return []
        return [Tracing()]
    except ImportError as exc:  # a namespace package without the API
        log.debug("no tracing: %s", exc)
        return []
