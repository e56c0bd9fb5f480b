"""What tests/conformance/test_tracing.py runs in a process of its own (`python -m tests.tracing_scripts MODE`):
a process's global tracer provider and its imported modules are the point.

- `off URL`, `disabled URL`, `unavailable URL`, `on URL`: queue and consume with tracing turned off
  (`Project(tracing=False)`), disabled (OTEL_SDK_DISABLED=true), unavailable (OpenTelemetry
  cannot be imported), or on; print the OpenTelemetry modules then imported, as JSON.
- `service`: the FastAPI example with an SDK tracer provider: one POST from a client span, the
  email's first attempt failing at a stand-in mail API; print every finished span, as JSON.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan

TIMEOUT = 30.0


def absent(mode: str, url: str) -> None:
    if mode == "unavailable":
        sys.modules["opentelemetry"] = None  # type: ignore[assignment] # import opentelemetry fails
    if mode == "disabled":
        os.environ["OTEL_SDK_DISABLED"] = "true"
    import tenacity

    from nobs_amqp import Project, Worker
    from nobs_amqp.testing import drain
    from tests.apps import tasks

    worker = Worker("w", stop=tenacity.stop_after_attempt(2), wait=tenacity.wait_fixed(1))
    project = Project(
        "untraced", [worker], url=url, packages=["tests.apps"], modules=["tests.apps.tasks"], tracing=mode != "off"
    )

    async def run() -> int:
        async with project:
            await worker.queue(tasks.record, tasks.Job(key="ok"))
            await worker.queue(tasks.always_fail, tasks.Job(key="fails"))  # a retry, then a dead letter
            return await drain(project, timeout=TIMEOUT)

    ran = asyncio.run(run())
    loaded = sorted(m for m, module in sys.modules.items() if m.partition(".")[0] == "opentelemetry" and module)
    print(json.dumps({"ran": ran, "opentelemetry": loaded}))


@contextmanager
def mail_api() -> Iterator[str]:
    """A stand-in mail provider: the first POST of each message (by Idempotency-Key) gets a 503."""
    seen: set[str] = set()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            key = self.headers.get("Idempotency-Key", "")
            status = 200 if key in seen else 503
            seen.add(key)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def service() -> None:
    import httpx
    from opentelemetry import propagate, trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # as an application does, before it serves

    from examples.fastapi_service.app import CONSUME_ENV, composed_app
    from examples.fastapi_service.tasks import MAIL_API_ENV

    def done(message_id: str) -> bool:
        return any(
            s.name == "process emails"
            and s.attributes is not None
            and s.attributes.get("messaging.message.id") == message_id
            and s.attributes.get("nobs_amqp.outcome") == "succeeded"
            for s in exporter.get_finished_spans()
        )

    async def run() -> None:
        tracer = trace.get_tracer("tests.tracing_scripts")
        transport = httpx.ASGITransport(app=composed_app)
        async with (
            composed_app.router.lifespan_context(composed_app),
            httpx.AsyncClient(transport=transport, base_url="http://service") as client,
        ):
            # The caller's span, its context in the request's headers as an instrumented client sends
            # it: FastAPI's own server span (if this FastAPI traces) continues its trace.
            with tracer.start_as_current_span("POST /emails", kind=trace.SpanKind.CLIENT):
                headers: dict[str, str] = {}
                propagate.inject(headers)
                email = {"to": "ola@nordmann.no", "subject": "traced"}
                response = await client.post("/emails", json=email, headers=headers)
            assert response.status_code == 202, response.text
            message_id = response.json()["message_id"]
            deadline = time.monotonic() + TIMEOUT
            while not done(message_id):
                assert time.monotonic() < deadline, "the email's second attempt did not succeed in time"
                await asyncio.sleep(0.05)

    with mail_api() as url:
        os.environ[MAIL_API_ENV] = url
        os.environ[CONSUME_ENV] = "1"  # the app consumes `emails` in this process
        asyncio.run(run())
    print(json.dumps([_span(s) for s in exporter.get_finished_spans()]))


def _span(span: ReadableSpan) -> dict[str, Any]:
    parent = span.parent
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{span.context.trace_id:032x}",
        "span_id": f"{span.context.span_id:016x}",
        "parent_id": f"{parent.span_id:016x}" if parent is not None else None,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "events": [event.name for event in span.events],
    }


if __name__ == "__main__":
    if sys.argv[1] == "service":
        service()
    else:
        absent(sys.argv[1], sys.argv[2])
