"""Traces (issue 11, item 4): OpenTelemetry spans for publish and process, the W3C trace context
in the headers and in retry copies, tasks inside their span (sync ones in their thread too), one
trace from an HTTP request through every attempt; and no OpenTelemetry import without it."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
import tenacity
from pydantic import BaseModel

from nobs_amqp import Project, Worker
from nobs_amqp import message as wire
from nobs_amqp.observe.observer import Observer
from nobs_amqp.observe.tracing import Tracing, automatic
from nobs_amqp.testing import drain

from ..support import ROOT

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

PROJECT = "nobs-test"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

# -- tasks that say which span they run in -------------------------------------------------------

#: (trace id, span id, thread name) of the span current inside each run, by key.
SEEN: dict[str, list[tuple[int, int, str]]] = defaultdict(list)


class Probe(BaseModel):
    key: str
    fail: bool = False


@dataclass
class SyncProbe:
    key: str


def _note(key: str) -> None:
    context = trace.get_current_span().get_span_context()
    SEEN[key].append((context.trace_id, context.span_id, threading.current_thread().name))


async def span_probe(probe: Probe) -> None:
    _note(probe.key)
    if probe.fail:
        raise RuntimeError(f"failing {probe.key} on purpose")


def span_probe_sync(probe: SyncProbe) -> None:
    _note(probe.key)


# -- helpers ------------------------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """A tracer provider of the test's own (the process's global one stays the no-op)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def key() -> str:
    return uuid.uuid4().hex


def attribute(span: ReadableSpan, name: str) -> Any:
    return (span.attributes or {}).get(name)


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


# -- in this process ----------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_tasks_run_in_their_process_span_and_a_retry_stays_in_the_trace(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    worker = Worker("traced", stop=tenacity.stop_after_attempt(2), wait=tenacity.wait_fixed(5))
    project = Project(
        PROJECT,
        [worker],
        packages=["tests"],
        modules=["tests.conformance.test_tracing"],
        url=f"memory://{key()}",
        observers=[Tracing(provider)],  # given: the project adds no second one
    )
    a, b, c = key(), key(), key()
    async with project:
        with provider.get_tracer("test").start_as_current_span("caller") as caller:
            ids = {
                a: await worker.queue(span_probe, Probe(key=a)),
                b: await worker.queue(span_probe_sync, SyncProbe(key=b)),
                c: await worker.queue(span_probe, Probe(key=c, fail=True)),
            }
        assert await drain(project, timeout=20) == 4
    trace_id = caller.get_span_context().trace_id
    finished = exporter.get_finished_spans()
    assert {s.context.trace_id for s in finished} == {trace_id}
    process = {(attribute(s, "messaging.message.id"), attribute(s, "nobs_amqp.attempt")): s for s in finished
               if s.name == "process traced"}  # fmt: skip
    assert sorted(process) == sorted([(ids[a], 1), (ids[b], 1), (ids[c], 1), (ids[c], 2)])
    publish = {(attribute(s, "messaging.message.id"), attribute(s, "nobs_amqp.attempt")): s for s in finished
               if s.name == "publish traced"}  # fmt: skip
    caller_id = caller.get_span_context().span_id
    for k in (a, b, c):
        assert parent_of(publish[ids[k], 1]) == caller_id
        assert parent_of(process[ids[k], 1]) == publish[ids[k], 1].context.span_id
    # The task's code runs in its delivery's span, a sync task in a thread of its own too.
    assert SEEN[a] == [(trace_id, process[ids[a], 1].context.span_id, threading.current_thread().name)]
    [(_, span_id, thread)] = SEEN[b]
    assert span_id == process[ids[b], 1].context.span_id and thread.startswith("nobs-traced-")
    assert [s for _, s, _ in SEEN[c]] == [process[ids[c], 1].context.span_id, process[ids[c], 2].context.span_id]

    ok = process[ids[a], 1]
    assert ok.kind is trace.SpanKind.CONSUMER and ok.status.status_code is trace.StatusCode.UNSET
    assert dict(ok.attributes or {}) == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "traced",
        "messaging.message.id": ids[a],
        "nobs_amqp.task": "tests.conformance.test_tracing:span_probe",
        "nobs_amqp.attempt": 1,
        "nobs_amqp.outcome": "succeeded",
    }
    sent = publish[ids[a], 1]
    assert sent.kind is trace.SpanKind.PRODUCER
    assert attribute(sent, "messaging.operation.type") == "send"
    assert attribute(sent, "messaging.rabbitmq.destination.routing_key") == "traced"

    # A retry: the failed attempt's span publishes the retry copy, whose span is the next one's parent.
    first, second = process[ids[c], 1], process[ids[c], 2]
    assert first.status.status_code is trace.StatusCode.ERROR
    assert (attribute(first, "nobs_amqp.outcome"), attribute(first, "nobs_amqp.retry_delay")) == ("retried", 5)
    assert attribute(first, "error.type") == "builtins.RuntimeError"
    assert [e.name for e in first.events] == ["exception"]
    retry = publish[ids[c], 2]
    assert parent_of(retry) == first.context.span_id and parent_of(second) == retry.context.span_id
    assert attribute(retry, "nobs_amqp.eta") is not None
    assert attribute(retry, "messaging.rabbitmq.destination.routing_key") is None  # through the ladder
    assert second.status.status_code is trace.StatusCode.ERROR
    assert (attribute(second, "nobs_amqp.outcome"), attribute(second, "nobs_amqp.reason")) == (
        "dead_lettered",
        "max_attempts",
    )
    [dead] = [s for s in finished if s.name == "publish traced.dlx"]
    assert parent_of(dead) == second.context.span_id


def test_a_project_adds_tracing_unless_told_not_to(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    [added] = automatic([])
    assert isinstance(added, Tracing)
    assert automatic([], enabled=False) == []
    assert automatic([Observer(), Tracing()]) == [], "one given: no second one"
    monkeypatch.setenv("OTEL_SDK_DISABLED", "True")
    assert automatic([]) == []


def test_retry_and_dead_letter_copies_carry_the_trace_context_a_replay_does_not() -> None:
    now = datetime.now(UTC)
    message = wire.new_message(b"{}", "m:f", "p", now=now)
    traced = wire.Message(
        message.body, message.task, message.message_id, message.app_id, message.timestamp,
        {**message.headers, "traceparent": TRACEPARENT, "tracestate": "nobs=1", "baggage": "x=1"},
    )  # fmt: skip
    for copy in (
        wire.retry_copy(traced, 5, now=now),
        wire.dead_letter_copy(traced, wire.Reason.REJECTED, None, now=now),
    ):
        assert (copy.headers["traceparent"], copy.headers["tracestate"]) == (TRACEPARENT, "nobs=1")
        assert "baggage" not in copy.headers
    assert "traceparent" not in wire.replay_copy(traced, now=now).headers
    for bad in (7, b"bytes", "x" * 600, "line\nbreak", ""):
        forged = wire.Message(b"{}", "m:f", "id", "p", now, {"traceparent": bad})
        assert "traceparent" not in wire.retry_copy(forged, 5, now=now).headers, bad


# -- in processes of their own ------------------------------------------------------------------


async def _script(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.tracing_scripts",
        *args,
        cwd=ROOT,
        env={**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.timeout(60)
async def test_without_tracing_nothing_of_opentelemetry_is_imported() -> None:
    modes = ("off", "disabled", "unavailable", "on")
    results = await asyncio.gather(*(_script(mode, f"memory://{key()}") for mode in modes))
    loaded = {}
    for mode, (code, out, err) in zip(modes, results, strict=True):
        assert code == 0, err
        report = json.loads(out.splitlines()[-1])
        assert report["ran"] == 3, (mode, report)
        loaded[mode] = report["opentelemetry"]
    assert loaded["off"] == loaded["disabled"] == loaded["unavailable"] == []
    assert "opentelemetry.trace" in loaded["on"], "the check sees an import when there is one"


@pytest.mark.rabbitmq
@pytest.mark.timeout(60)
async def test_without_tracing_nothing_of_opentelemetry_is_imported_on_rabbitmq(vhost_url: str) -> None:
    code, out, err = await _script("off", vhost_url)
    assert code == 0, err
    assert json.loads(out.splitlines()[-1]) == {"ran": 3, "opentelemetry": []}


@pytest.mark.rabbitmq
@pytest.mark.timeout(60)
async def test_an_http_request_its_publish_and_every_attempt_of_the_task_share_one_trace(vhost_url: str) -> None:
    """The FastAPI example, consuming in its own process: the first attempt fails at the mail API."""
    code, out, err = await _script("service", env={"NOBS_AMQP_URL": vhost_url})
    assert code == 0, err
    found: list[dict[str, Any]] = json.loads(out.splitlines()[-1])
    [request] = [s for s in found if s["name"] == "POST /emails" and s["kind"] == "CLIENT"]
    mine = [s for s in found if s["trace_id"] == request["trace_id"]]
    by_id = {s["span_id"]: s for s in mine}

    def ancestors(span: dict[str, Any]) -> list[dict[str, Any]]:
        chain = []
        while span["parent_id"] is not None:
            span = by_id[span["parent_id"]]
            chain.append(span)
        return chain

    def child(parent: dict[str, Any], name: str) -> dict[str, Any]:
        [span] = [s for s in mine if s["parent_id"] == parent["span_id"] and s["name"] == name]
        return span

    [published] = [s for s in mine if s["name"] == "publish emails" and s["attributes"]["nobs_amqp.attempt"] == 1]
    assert request in ancestors(published)
    # FastAPI's own request span, where this FastAPI traces, is between them.
    server = [s for s in ancestors(published) if s["kind"] == "SERVER"]
    assert all(s["name"] == "POST /emails" for s in server)
    first = child(published, "process emails")
    retry = child(first, "publish emails")
    second = child(retry, "process emails")
    tasks_own = [child(first, "send email"), child(second, "send email")]
    message_id = published["attributes"]["messaging.message.id"]
    of_message = [s for s in found if s["attributes"].get("messaging.message.id") == message_id]
    assert sorted(s["span_id"] for s in of_message) == sorted(s["span_id"] for s in (published, first, retry, second))
    assert len([s for s in mine if s["name"] == "send email"]) == 2
    assert (published["kind"], retry["kind"], first["kind"], second["kind"]) == (
        "PRODUCER",
        "PRODUCER",
        "CONSUMER",
        "CONSUMER",
    )
    assert (first["status"], first["attributes"]["nobs_amqp.outcome"]) == ("ERROR", "retried")
    assert first["attributes"]["error.type"] == "httpx.HTTPStatusError" and "exception" in first["events"]
    assert (second["status"], second["attributes"]["nobs_amqp.outcome"]) == ("UNSET", "succeeded")
    assert [s["status"] for s in tasks_own] == ["ERROR", "UNSET"]
    assert published["attributes"]["messaging.system"] == "rabbitmq"
    assert published["attributes"]["messaging.rabbitmq.destination.routing_key"] == "emails"
