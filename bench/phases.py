"""The phases: each runs one system's adapter against a fresh queue and returns one measurement."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envs import Env
from mgmt import Management, ManagementError
from proctree import TreeSampler

ENQUEUE_PHASES = ("enqueue_sequential", "enqueue_concurrent", "enqueue_batched")
DRAIN_PHASES = ("drain_default", "drain_tuned")
PHASES = (*ENQUEUE_PHASES, *DRAIN_PHASES, "retry_path", "memory_depth")
DEFAULT_PHASES = (*ENQUEUE_PHASES, *DRAIN_PHASES, "retry_path")
RETRY_MAX = 5000  # retry_path uses min(N, RETRY_MAX) tasks
MEMORY_DEPTHS = (1_000, 100_000)
PREFILL = "enqueue_concurrent"  # the fastest path of every system (the sync ones use threads)
POLL = 0.05  # seconds between looks at the done-counter and the worker's process tree
STOP_GRACE = 15.0  # seconds a worker gets to exit after SIGTERM before SIGKILL
MANAGEMENT_WAIT = 8.0  # seconds after the last task ran to wait for the management API to agree


class PhaseError(Exception):
    """A phase could not be measured; the message says why."""


@dataclass
class Context:
    system: str
    env: Env
    url: str  # AMQP URL of the run's vhost
    vhost: str
    management: Management
    n: int
    workdir: Path
    round: int
    confirm_with_management: bool = True


def _queue_name(ctx: Context, phase: str) -> str:
    return f"bench-{ctx.system}-{phase}-r{ctx.round}-{uuid.uuid4().hex[:6]}"


def _adapter(ctx: Context, command: str, queue: str, *extra: str) -> list[str]:
    return [str(ctx.env.python), str(ctx.env.adapter()), command, "--queue", queue, "--url", ctx.url, *extra]


def _run_json(ctx: Context, argv: list[str], timeout: float) -> dict[str, Any]:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, cwd=ctx.workdir)
    except subprocess.TimeoutExpired:
        raise PhaseError(f"{argv[2]} timed out after {timeout:.0f} s") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:]) or f"exit {done.returncode}"
        raise PhaseError(f"{argv[2]} failed: {tail}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def produce(ctx: Context, phase: str, queue: str, n: int) -> dict[str, Any]:
    argv = _adapter(ctx, "produce", queue, "--phase", phase, "--n", str(n))
    return _run_json(ctx, argv, timeout=60 + n * 0.05)


def count(ctx: Context, queue: str) -> int:
    return int(_run_json(ctx, _adapter(ctx, "count", queue), timeout=60)["messages"])


def cleanup(ctx: Context, queue: str) -> None:
    with contextlib.suppress(ManagementError):
        ctx.management.delete_queues(ctx.vhost, queue)


def enqueue(ctx: Context, phase: str) -> dict[str, Any]:
    queue = _queue_name(ctx, phase)
    try:
        result = produce(ctx, phase, queue, ctx.n)
        queued = count(ctx, queue)
    finally:
        cleanup(ctx, queue)
    if queued != ctx.n:
        raise PhaseError(f"{queued} messages in the queue after {ctx.n} confirmed publishes")
    cpu = float(result["cpu_seconds"])
    return {
        "rate": ctx.n / float(result["seconds"]),
        "seconds": result["seconds"],
        "cpu_per_1000": cpu * 1000 / ctx.n,
        "peak_rss_mib": result.get("peak_rss_mib"),
        "loop": result.get("loop"),
        "queued": queued,
    }


def _counted(folder: Path) -> int:
    total = 0
    for entry in os.scandir(folder):
        total += entry.stat().st_size
    return total


def _stop(process: subprocess.Popen[bytes]) -> str:
    if process.poll() is not None:
        return f"exited by itself ({process.returncode})"
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(STOP_GRACE)
        return "sigterm"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        return "sigkill"


def _management_done(ctx: Context, queue: str) -> bool:
    try:
        info = ctx.management.queue(ctx.vhost, queue)
    except ManagementError:
        return False
    return bool(info) and info.get("messages") == 0 and info.get("messages_unacknowledged") == 0  # type: ignore[union-attr]


def run_worker(ctx: Context, queue: str, expected: int, *flags: str) -> dict[str, Any]:
    """Start one worker on a prefilled `queue`, time it until `expected` tasks ran, stop it."""
    counter = Path(tempfile.mkdtemp(prefix="counter-", dir=ctx.workdir))
    log = (ctx.workdir / f"{queue}.log").open("wb")
    env = {**os.environ, "BENCH_COUNTER_DIR": str(counter)}
    deadline_s = 60 + expected * 0.05
    start = time.perf_counter()
    process = subprocess.Popen(
        _adapter(ctx, "worker", queue, *flags), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    sampler = TreeSampler(process.pid)
    first = done = management_done = None
    cpu_first = cpu_done = 0.0
    next_management = start
    try:
        while (now := time.perf_counter()) - start < deadline_s:
            sampler.sample()
            ran = _counted(counter)
            if first is None and ran > 0:
                first, cpu_first = now - start, sampler.cpu_seconds
            if done is None and ran >= expected:
                done, cpu_done = now - start, sampler.cpu_seconds
                if not ctx.confirm_with_management:
                    break
            if ctx.confirm_with_management and now >= next_management:
                # Its statistics are refreshed every 5 s (collect_statistics_interval): a late, second opinion.
                next_management = now + 0.5
                if done is not None and _management_done(ctx, queue):
                    management_done = now - start
                    break
            if process.poll() is not None:
                break
            if done is not None and now - start > done + MANAGEMENT_WAIT:
                break
            time.sleep(POLL)
        stopped = _stop(process)
    finally:
        log.close()
    if done is None:
        tail = " | ".join((ctx.workdir / f"{queue}.log").read_text(errors="replace").strip().splitlines()[-3:])
        raise PhaseError(
            f"{_counted(counter)} of {expected} tasks ran in {time.perf_counter() - start:.0f} s "
            f"(deadline {deadline_s:.0f} s; worker {stopped}): {tail}"
        )
    left = count(ctx, queue)  # no consumer is left: anything unacked is back in the queue and counted here
    return {
        "rate": expected / done,
        "seconds": done,
        "time_to_first": first,
        "management_done": management_done,
        "cpu_per_1000": (cpu_done - cpu_first) * 1000 / expected,
        "cpu_startup": cpu_first,
        "peak_rss_mib": sampler.peak_rss_mib,
        "processes": sampler.processes,
        "left_in_queue": left,
        "stopped": stopped,
    }


def drain(ctx: Context, phase: str, n: int | None = None) -> dict[str, Any]:
    n = n or ctx.n
    queue = _queue_name(ctx, phase)
    try:
        prefill = produce(ctx, PREFILL, queue, n)
        result = run_worker(ctx, queue, n, *(["--tuned"] if phase == "drain_tuned" else []))
    finally:
        cleanup(ctx, queue)
    if result["left_in_queue"]:
        raise PhaseError(f"{result['left_in_queue']} messages were not acked after all {n} ran")
    return {**result, "prefill_seconds": prefill["seconds"]}


def retry_path(ctx: Context) -> dict[str, Any]:
    n = min(ctx.n, RETRY_MAX)
    queue = _queue_name(ctx, "retry_path")
    try:
        produce(ctx, "retry", queue, n)
        result = run_worker(ctx, queue, n, "--fail-once")
    finally:
        cleanup(ctx, queue)
    if result["left_in_queue"]:
        raise PhaseError(f"{result['left_in_queue']} messages were not acked after all {n} succeeded")
    return {**result, "messages": n}


def memory_depth(ctx: Context) -> dict[str, Any]:
    peaks = {}
    for depth in MEMORY_DEPTHS:
        peaks[depth] = drain(ctx, "memory_depth", depth)
    shallow, deep = (peaks[d] for d in MEMORY_DEPTHS)
    return {
        "rate": deep["rate"],
        "cpu_per_1000": deep["cpu_per_1000"],
        "time_to_first": deep["time_to_first"],
        "peak_rss_mib": deep["peak_rss_mib"],
        "peak_rss_mib_shallow": shallow["peak_rss_mib"],
        "rss_growth_mib": deep["peak_rss_mib"] - shallow["peak_rss_mib"],
        "depths": {str(d): peaks[d] for d in MEMORY_DEPTHS},
    }


def run_phase(ctx: Context, phase: str) -> dict[str, Any]:
    if phase in ENQUEUE_PHASES:
        return enqueue(ctx, phase)
    if phase in DRAIN_PHASES:
        return drain(ctx, phase)
    if phase == "retry_path":
        return retry_path(ctx)
    if phase == "memory_depth":
        return memory_depth(ctx)
    raise PhaseError(f"unknown phase {phase!r}")
