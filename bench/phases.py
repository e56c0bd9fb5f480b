"""The phases: each runs one system's adapter against a fresh queue and returns one measurement."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent / "systems" / "lib"))
from benchcommon import percentiles  # the adapters' own library: one definition for both sides
from envs import Env
from mgmt import Management, ManagementError
from proctree import TreeSampler

ENQUEUE_PHASES = ("enqueue_sequential", "enqueue_concurrent", "enqueue_batched")
DRAIN_PHASES = ("drain_default", "drain_tuned")
#: Phases with one rate per measurement: the main table.
RATE_PHASES = (*ENQUEUE_PHASES, *DRAIN_PHASES, "retry_path", "memory_depth")
#: Phases measured once per run (in its first round), each with a table of its own.
GROWTH_PHASES = ("payload_size", "project_scale", "dlq_scale")
PHASES = (*RATE_PHASES, "latency", "delay_accuracy", *GROWTH_PHASES)
DEFAULT_PHASES = (*ENQUEUE_PHASES, *DRAIN_PHASES, "retry_path")
ONCE_PHASES = ("memory_depth", "delay_accuracy", *GROWTH_PHASES)
RETRY_MAX = 5000  # retry_path uses min(N, RETRY_MAX) tasks
PREFILL = "enqueue_concurrent"  # the fastest path of every system (the sync ones use threads)
POLL = 0.05  # seconds between looks at the done-counter and the worker's process tree
STOP_GRACE = 15.0  # seconds a worker gets to exit after SIGTERM before SIGKILL
MANAGEMENT_WAIT = 8.0  # seconds after the last task ran to wait for the management API to agree


class PhaseError(Exception):
    """A phase could not be measured; the message says why."""


@dataclass(frozen=True)
class Sizes:
    """How big the latency, delay and growth phases are (`make bench`: these defaults)."""

    rates: tuple[float, ...] = (200, 1000, 3000)  # latency: tasks per second offered
    latency_seconds: float = 5.0  # latency: seconds of producing at each rate
    depths: tuple[int, ...] = (1_000, 100_000)  # memory_depth: queue depths drained
    payload_sizes: tuple[int, ...] = (100, 10_000, 1_000_000)  # payload_size: characters of content
    payload_budget_mb: float = 100.0  # payload_size: at most this many MB of payload per size
    scale_workers: tuple[int, ...] = (1, 10, 100)  # project_scale: workers in the project
    dlq_sizes: tuple[int, ...] = (1_000, 100_000)  # dlq_scale: dead letters
    delay_tasks: int = 3000  # delay_accuracy: delayed tasks per mode
    delay_max: int = 30  # delay_accuracy: delays are 1..this many whole seconds
    delay_rate: float = 200.0  # delay_accuracy: delayed tasks queued per second
    load_rate: float = 1000.0  # delay_accuracy under load: immediate tasks per second beside


QUICK = Sizes(
    latency_seconds=2.0,
    depths=(1_000, 10_000),
    payload_budget_mb=20.0,
    dlq_sizes=(100, 2_000),
    delay_tasks=500,
    delay_max=10,
    delay_rate=100.0,
    load_rate=500.0,
)


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
    sizes: Sizes = Sizes()


def _queue_name(ctx: Context, phase: str) -> str:
    return f"bench-{ctx.system}-{phase}-r{ctx.round}-{uuid.uuid4().hex[:6]}"


def _adapter(ctx: Context, command: str, queue: str, *extra: str) -> list[str]:
    return [*ctx.env.command(), command, "--queue", queue, "--url", ctx.url, *extra]


def _run_json(ctx: Context, argv: list[str], timeout: float) -> dict[str, Any]:
    what = next((a for a in argv if a in ("produce", "worker", "count", "scale", "dlq")), argv[-1])
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, cwd=ctx.workdir)
    except subprocess.TimeoutExpired:
        raise PhaseError(f"{what} timed out after {timeout:.0f} s") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:]) or f"exit {done.returncode}"
        raise PhaseError(f"{what} failed: {tail}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def produce(ctx: Context, phase: str, queue: str, n: int, *extra: str) -> dict[str, Any]:
    argv = _adapter(ctx, "produce", queue, "--phase", phase, "--n", str(n), *extra)
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
        # First to last task run: the rate without the worker's start-up (for the Java anchor's fractions).
        "steady_rate": (expected - 1) / (done - first) if first is not None and done > first else None,
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
    """A default worker draining each of `sizes.depths` (a fresh queue each): rate and peak RSS."""
    peaks = {depth: drain(ctx, "memory_depth", depth) for depth in ctx.sizes.depths}
    shallow, deep = peaks[min(peaks)], peaks[max(peaks)]
    return {
        "rate": deep["rate"],
        "cpu_per_1000": deep["cpu_per_1000"],
        "time_to_first": deep["time_to_first"],
        "peak_rss_mib": deep["peak_rss_mib"],
        "peak_rss_mib_shallow": shallow["peak_rss_mib"],
        "rss_growth_mib": deep["peak_rss_mib"] - shallow["peak_rss_mib"],
        "depths": {str(d): peaks[d] for d in sorted(peaks)},
    }


# -- a worker kept running across several producer runs (latency, delay_accuracy) ----------------


class Running:
    """One worker (default settings) on `queue`, with a done-counter and latency files to read."""

    def __init__(self, ctx: Context, queue: str) -> None:
        self.counter = Path(tempfile.mkdtemp(prefix="counter-", dir=ctx.workdir))
        self.latency = Path(tempfile.mkdtemp(prefix="latency-", dir=ctx.workdir))
        self.log_path = ctx.workdir / f"{queue}.log"
        self._log = self.log_path.open("wb")
        env = {**os.environ, "BENCH_COUNTER_DIR": str(self.counter), "BENCH_LATENCY_DIR": str(self.latency)}
        self.process = subprocess.Popen(
            _adapter(ctx, "worker", queue), stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.sampler = TreeSampler(self.process.pid)
        self._read: dict[str, int] = {}

    def ran(self) -> int:
        return _counted(self.counter)

    def wait_for(self, expected: int, timeout: float) -> float | None:
        """Wall-clock time (time.time()) when `expected` tasks had run; None if not within `timeout` s."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline and self.process.poll() is None:
            self.sampler.sample()
            if self.ran() >= expected:
                return time.time()
            time.sleep(POLL)
        return None

    def records(self) -> list[tuple[float, int]]:
        """(seconds late, delay asked) of each stamped task that ran since the last call."""
        found: list[tuple[float, int]] = []
        for entry in os.scandir(self.latency):
            with open(entry.path, "rb") as file:
                file.seek(self._read.get(entry.name, 0))
                data = file.read()
            complete = data[: data.rfind(b"\n") + 1]
            self._read[entry.name] = self._read.get(entry.name, 0) + len(complete)
            for line in complete.decode().splitlines():
                late, _, delay = line.partition(" ")
                found.append((float(late), int(delay)))
        return found

    def tail(self) -> str:
        self._log.flush()
        return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-3:])

    def warm(self, ctx: Context, queue: str) -> None:
        """One task through the system's own producer, and wait until this worker ran it."""
        produce(ctx, "enqueue_sequential", queue, 1)
        if self.wait_for(1, 60) is None:
            raise PhaseError(f"the worker ran no task within 60 s of its start: {self.tail()}")

    def stop(self) -> str:
        try:
            return _stop(self.process)
        finally:
            self._log.close()


def _ms(stats: dict[str, Any]) -> str:
    return "/".join("–" if stats[k] is None else f"{stats[k] * 1000:.1f}" for k in ("p50", "p99", "max"))


def latency(ctx: Context) -> dict[str, Any]:
    """A default worker; the system's producer sends at each of `sizes.rates` for `latency_seconds`,
    open loop. Per rate: enqueue-to-start of every task, the producer's enqueue call durations."""
    queue = _queue_name(ctx, "latency")
    seconds = ctx.sizes.latency_seconds
    per_rate: dict[str, Any] = {}
    worker = Running(ctx, queue)
    try:
        worker.warm(ctx, queue)
        expected = 1
        for rate in ctx.sizes.rates:
            cpu = worker.sampler.cpu_seconds
            extra = ("--phase", "latency", "--rate", str(rate), "--seconds", str(seconds))
            sent = _run_json(ctx, _adapter(ctx, "produce", queue, *extra), timeout=90 + 3 * seconds)
            expected += sent["messages"] + sent["warmup"]
            done = worker.wait_for(expected, 60 + 2 * seconds)
            if done is None:
                raise PhaseError(f"at {rate:g}/s, {worker.ran()} of {expected} tasks ran: {worker.tail()}")
            late = [late for late, delay in worker.records() if delay == 0]
            n = sent["messages"]
            per_rate[f"{rate:g}"] = {
                "offered": rate,
                "messages": n,
                "enqueue_to_start": percentiles(late),
                "queue_call": sent["queue_seconds"],
                "lag": sent["lag_seconds"],
                "publish_rate": n / max(1e-9, sent["paced_to"] - sent["paced_from"]),
                "throughput": n / max(1e-9, done - sent["paced_from"]),
                "producer_cpu_per_1000": sent["cpu_seconds"] * 1000 / n,
                "worker_cpu_per_1000": (worker.sampler.cpu_seconds - cpu) * 1000 / n,
            }
    finally:
        worker.stop()
        cleanup(ctx, queue)
    shown = ", ".join(f"{r}/s {_ms(v['enqueue_to_start'])} ms" for r, v in per_rate.items())
    return {"rates": per_rate, "peak_rss_mib": worker.sampler.peak_rss_mib, "shown": f"p50/p99/max {shown}"}


def delay_accuracy(ctx: Context) -> dict[str, Any]:
    """`delay_tasks` tasks delayed 1..`delay_max` s, queued at `delay_rate`/s to a default worker:
    how late each started. Once idle, once beside immediate tasks at `load_rate`/s."""
    sizes = ctx.sizes
    modes: dict[str, Any] = {}
    for mode, load in (("idle", 0.0), ("load", sizes.load_rate)):
        queue = _queue_name(ctx, f"delay-{mode}")
        worker = Running(ctx, queue)
        try:
            worker.warm(ctx, queue)
            span = sizes.delay_tasks / sizes.delay_rate + sizes.delay_max + 1
            extra = ["--phase", "delayed", "--n", str(sizes.delay_tasks), "--rate", str(sizes.delay_rate)]
            extra += ["--delay-max", str(sizes.delay_max), "--load-rate", str(load)]
            sent = _run_json(ctx, _adapter(ctx, "produce", queue, *extra), timeout=120 + 2 * span)
            expected = 1 + sent["messages"] + sent["warmup"]
            if worker.wait_for(expected, sizes.delay_max + 60) is None:
                raise PhaseError(f"{mode}: {worker.ran()} of {expected} tasks ran: {worker.tail()}")
            records = worker.records()
        finally:
            worker.stop()
            cleanup(ctx, queue)
        delayed = [late for late, delay in records if delay > 0]
        modes[mode] = {
            "delayed": len(delayed),
            "late": percentiles(delayed),
            "early": sum(1 for late in delayed if late < 0),
            "load_rate": load,
            "load_latency": percentiles([late for late, delay in records if delay == 0]) if load else None,
        }
    shown = ", ".join(f"{m} late {v['late']['p50']:.3f}/{v['late']['p99']:.3f} s" for m, v in modes.items())
    return {"modes": modes, "shown": f"p50/p99 {shown}"}


# -- growth: payload size, project size, DLQ size --------------------------------------------------


def payload_size(ctx: Context) -> dict[str, Any]:
    """Per payload size: concurrent enqueue into a fresh queue, then a default worker drains it."""
    per_size: dict[str, Any] = {}
    for size in ctx.sizes.payload_sizes:
        n = max(10, min(ctx.n, int(ctx.sizes.payload_budget_mb * 1e6 // size)))
        queue = _queue_name(ctx, f"payload{size}")
        try:
            sent = produce(ctx, "enqueue_concurrent", queue, n, "--size", str(size))
            queued = count(ctx, queue)
            if queued != n:
                raise PhaseError(f"{queued} messages in the queue after {n} confirmed publishes of {size} B")
            drained = run_worker(ctx, queue, n)
        finally:
            cleanup(ctx, queue)
        if drained["left_in_queue"]:
            raise PhaseError(f"{drained['left_in_queue']} messages of {size} B were not acked after all {n} ran")
        enqueue_rate = n / float(sent["seconds"])
        per_size[str(size)] = {
            "n": n,
            "enqueue_rate": enqueue_rate,
            "enqueue_mb_s": enqueue_rate * size / 1e6,
            "producer_rss_mib": sent.get("peak_rss_mib"),
            "drain_rate": drained["rate"],
            "drain_mb_s": drained["rate"] * size / 1e6,
            "worker_rss_mib": drained["peak_rss_mib"],
            "time_to_first": drained["time_to_first"],
        }
    shown = ", ".join(f"{s} B {v['enqueue_rate']:,.0f}/{v['drain_rate']:,.0f}" for s, v in per_size.items())
    return {"sizes": per_size, "shown": f"enqueue/drain msg/s {shown}"}


def project_scale(ctx: Context) -> dict[str, Any]:
    """A project of N workers (the adapter's `scale` command) for each N of `sizes.scale_workers`."""
    per_n: dict[str, Any] = {}
    for n in ctx.sizes.scale_workers:
        queue = _queue_name(ctx, f"scale{n}")
        try:
            per_n[str(n)] = _run_json(ctx, _adapter(ctx, "scale", queue, "--workers", str(n)), timeout=180 + 3 * n)
        finally:
            cleanup(ctx, queue)
    shown = ", ".join(
        f"{n}: {v['first_publish_all_seconds']:.2f}/{v['consume_all_ready_seconds']:.2f}" for n, v in per_n.items()
    )
    return {"workers": per_n, "shown": f"first publish to all / consuming all ready, s: {shown}"}


def dlq_scale(ctx: Context) -> dict[str, Any]:
    """N dead letters, then `nobs-amqp dlq list/show/replay` timed (the adapter's `dlq` command)."""
    per_n: dict[str, Any] = {}
    for n in ctx.sizes.dlq_sizes:
        queue = _queue_name(ctx, f"dlq{n}")
        try:
            argv = _adapter(ctx, "dlq", queue, "--dead-letters", str(n))
            per_n[str(n)] = _run_json(ctx, argv, timeout=300 + n * 0.02)
        finally:
            cleanup(ctx, queue)
    shown = ", ".join(
        f"{n}: {v['list']['seconds']:.1f}/{v['show']['seconds']:.1f}/{v['replay']['seconds']:.1f}"
        for n, v in per_n.items()
    )
    return {"dead_letters": per_n, "shown": f"list/show/replay s: {shown}"}


def run_phase(ctx: Context, phase: str) -> dict[str, Any]:
    if phase in ENQUEUE_PHASES:
        return enqueue(ctx, phase)
    if phase in DRAIN_PHASES:
        return drain(ctx, phase)
    if phase == "retry_path":
        return retry_path(ctx)
    if phase == "memory_depth":
        return memory_depth(ctx)
    simple = {
        "latency": latency,
        "delay_accuracy": delay_accuracy,
        "payload_size": payload_size,
        "project_scale": project_scale,
        "dlq_scale": dlq_scale,
    }
    if phase in simple:
        return simple[phase](ctx)
    raise PhaseError(f"unknown phase {phase!r}")
