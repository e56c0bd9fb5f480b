"""How the drain rate scales with worker processes: on one node, and on a three-node cluster.

    .venv/bin/python bench/scale.py                       # 20,000 messages, 1/2/4 processes, 2 rounds
    .venv/bin/python bench/scale.py --n 5000 --rounds 1   # a quick look (about 3 minutes)

For each target (`single`: one RabbitMQ node; `cluster`: three clustered nodes, queues replicated
to all three) and each way of adding processes (`processes`: one `nobs-amqp consume --processes K`;
`nodes`: K separate `nobs-amqp consume` processes, the i-th connected first to node i mod 3), it
prefills a fresh quorum queue with N no-op tasks, starts the workers, and measures the rate from
the first task taken to the queue's last ready message taken, plus the CPU seconds the workers
and the broker nodes spent meanwhile. `cores busy` is all that CPU over the wall time: on this
machine's 2 cores, a value near 2 means the run was bound by the CPU that broker and workers
share, not by the number of workers.

Every node is a throwaway one of the installed RabbitMQ (tests/nodes.py and tests/cluster.py:
root or the rabbitmq user); the shared broker is not used. Everything it starts is ended by pid,
every wait has a deadline. It prints a table and `SCALE-FIGURES {json}`. When imported (as the
worker processes do, `--app scale:project`) it only defines the project.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from nobs_amqp import Project, Worker

REPO = Path(__file__).resolve().parents[1]
PROJECT = "nobs-scale"
TUNED = {"prefetch": 100, "concurrency": 50}  # as bench/run.py's drain_tuned
PAYLOAD_CONTENT = "x" * 100
MODES = ("processes", "nodes")


class Email(BaseModel):
    email: str
    content: str


async def send_email(request: Email) -> None:
    """The no-op task: what is measured is the framework and the broker."""


#: The project the worker processes load (`--app scale:project`, with bench/ on PYTHONPATH).
worker = Worker(os.environ.get("NOBS_SCALE_QUEUE", "scale"), **TUNED)  # type: ignore[arg-type]
project = Project(name=PROJECT, workers=[worker], packages=["scale"])


@dataclass
class Measurement:
    target: str
    mode: str
    processes: int
    round: int
    messages: int
    seconds: float
    rate: float
    worker_cpu: float  # seconds, all worker processes
    broker_cpu: float  # seconds, all broker nodes


# -- processes ----------------------------------------------------------------------------------


def _samplers(pids: list[int]) -> list[Any]:
    """A CPU sampler per process tree (bench/proctree.py)."""
    sys.path.insert(0, str(REPO / "bench"))
    from proctree import TreeSampler

    return [TreeSampler(pid) for pid in pids]


def _cpu(samplers: list[Any]) -> float:
    for sampler in samplers:
        sampler.sample()
    return sum(float(sampler.cpu_seconds) for sampler in samplers)


def start_workers(
    queue: str, urls: list[list[str]], processes: int | None, folder: Path
) -> list[subprocess.Popen[bytes]]:
    """One `nobs-amqp consume` per URL list (with `--processes` if given), logging to `folder`."""
    procs = []
    for i, order in enumerate(urls):
        env = {
            **os.environ,
            "NOBS_AMQP_URL": ",".join(order),
            "NOBS_SCALE_QUEUE": queue,
            "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "bench")]),
        }
        command = [sys.executable, "-m", "nobs_amqp", "--app", "scale:project", "--log-level", "warning"]
        command += ["consume", queue, "--grace-period", "5"]
        if processes is not None:
            command += ["--processes", str(processes)]
        with (folder / f"{queue}-{i}.log").open("ab") as log:
            procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# -- one measurement ----------------------------------------------------------------------------


async def ready(url: str, queue: str) -> int:
    import aio_pika

    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)
    finally:
        await connection.close()


async def drain_once(
    target: str, mode: str, k: int, rnd: int, urls: list[str], beams: list[int], n: int, folder: Path
) -> Measurement:
    sys.path.insert(0, str(REPO / "bench"))
    import scale  # this file as the worker processes import it, not as __main__

    queue = f"scale-{target}-{mode}-{k}-{rnd}"
    worker = Worker(queue, **TUNED)  # type: ignore[arg-type]
    producer = Project(name=PROJECT, workers=[worker], url=urls, packages=["scale"])
    payload = Email(email="a@b.c", content=PAYLOAD_CONTENT)
    async with producer:
        for start in range(0, n, 1000):
            await worker.queue_many(scale.send_email, [scale.Email(**payload.model_dump())] * min(1000, n - start))
    if mode == "processes":
        orders = [urls]
        procs = start_workers(queue, orders, k, folder)
    else:
        orders = [urls[i % len(urls) :] + urls[: i % len(urls)] for i in range(k)]
        procs = start_workers(queue, orders, None, folder)
    try:
        deadline = time.monotonic() + max(120.0, n / 200)
        left = n
        while left >= n:  # until the first task is taken
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"{queue}: the workers took nothing (logs in {folder})")
            await asyncio.sleep(0.05)
            left = await ready(urls[0], queue)
        started, taken_before = time.monotonic(), n - left
        workers, brokers = _samplers([p.pid for p in procs]), _samplers(beams)
        cpu_before = _cpu(workers), _cpu(brokers)
        while left > 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{queue}: {left} messages still ready at the deadline")
            await asyncio.sleep(0.05)
            _cpu(workers)  # children of --processes that come and go are counted too
            left = await ready(urls[0], queue)
        seconds = time.monotonic() - started
        cpu_after = _cpu(workers), _cpu(brokers)
    finally:
        stop_workers(procs)
    messages = n - taken_before
    return Measurement(
        target,
        mode,
        k,
        rnd,
        messages,
        round(seconds, 3),
        round(messages / seconds, 1),
        round(cpu_after[0] - cpu_before[0], 3),
        round(cpu_after[1] - cpu_before[1], 3),
    )


# -- the run ------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def nodes(target: str) -> Any:
    """(URLs of a fresh vhost on every node, beam pids) of one node or a three-node cluster."""
    sys.path.insert(0, str(REPO))
    from tests.cluster import Cluster
    from tests.nodes import Node

    vhost = f"nobs-scale-{os.getpid()}"
    if target == "single":
        async with Node() as node:
            await node.ctl("add_vhost", vhost)
            await node.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
            yield [node.url + vhost], [node.beam_pid()]
        return
    async with Cluster() as cluster:
        await cluster.create_vhost(vhost)
        yield cluster.urls_for(vhost), [node.beam_pid() for node in cluster.nodes]


async def run(args: argparse.Namespace, folder: Path) -> list[Measurement]:
    results = []
    for target in args.targets:
        async with nodes(target) as (urls, beams):
            for rnd in range(1, args.rounds + 1):
                for mode in MODES:
                    for k in args.processes:
                        m = await drain_once(target, mode, k, rnd, urls, beams, args.n, folder)
                        print(
                            f"  {target:<7} {mode:<9} {k} process(es), round {rnd}: {m.rate:,.0f} msg/s",
                            flush=True,
                        )
                        results.append(m)
    return results


def table(results: list[Measurement]) -> str:
    """Median per (target, mode, K); the ratio to K=1 of the same target and mode."""
    groups: dict[tuple[str, str, int], list[Measurement]] = {}
    for m in results:
        groups.setdefault((m.target, m.mode, m.processes), []).append(m)

    rows = [
        "| target | mode | processes | msg/s (median) | × 1 process | worker CPU s/1000 "
        "| broker CPU s/1000 | cores busy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (target, mode, k), ms in sorted(groups.items()):
        rate = statistics.median([m.rate for m in ms])
        one = statistics.median([m.rate for m in groups.get((target, mode, 1), ms)])
        worker_cpu = statistics.median([1000 * m.worker_cpu / m.messages for m in ms])
        broker_cpu = statistics.median([1000 * m.broker_cpu / m.messages for m in ms])
        busy = statistics.median([(m.worker_cpu + m.broker_cpu) / m.seconds for m in ms])
        rows.append(
            f"| {target} | {mode} | {k} | {rate:,.0f} | {rate / one:.2f}× | {worker_cpu:.3f} "
            f"| {broker_cpu:.3f} | {busy:.2f} |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="messages per measurement (default 20,000)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--processes", default="1,2,4", help="worker process counts (default 1,2,4)")
    parser.add_argument("--targets", default="single,cluster", help="single, cluster or both (default)")
    args = parser.parse_args()
    args.processes = [int(k) for k in args.processes.split(",")]
    args.targets = [t for t in args.targets.split(",") if t]
    folder = Path(tempfile.mkdtemp(prefix="nobs-scale-"))
    per_measurement = 60 + args.n / 300
    cap = 300 + per_measurement * args.rounds * len(MODES) * len(args.processes) * len(args.targets)
    print(f"scale: {args.n} messages, processes {args.processes}, {args.rounds} rounds; logs in {folder}", flush=True)
    results = asyncio.run(asyncio.wait_for(run(args, folder), cap))
    print(table(results))
    print(f"SCALE-FIGURES {json.dumps([asdict(m) for m in results])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
