"""A bounded soak: workers, a producer and injected faults on a throwaway RabbitMQ node.

    .venv/bin/python bench/soak.py                 # about 5 minutes of producing, then drain
    .venv/bin/python bench/soak.py --minutes 1 --workers 2 --seed 7

It starts a RabbitMQ node of its own (tests/nodes.py: root or the rabbitmq user), runs
`--workers` `nobs-amqp consume` processes on it, and queues tasks continuously (some delayed,
some failing once, some hanging past the time limit, some raising SystemExit, a few killing
their worker). At random intervals it injects a fault: SIGKILL of a worker (a new one is
started), SIGTERM of a worker (it must exit 0), kill -9 of the broker then a start, or a
graceful broker restart. At the end it stops producing, lets the workers drain (bounded),
stops them with SIGTERM and accounts for every confirmed task: ran, or in the DLQ, or lost.

With `--cluster` it runs on three clustered nodes instead (tests/cluster.py): each worker and
each producer gets every node's URL, its own node first (rotating over the nodes), so they fail
over when their node goes; the broker faults (kill -9, graceful restart) rotate over the nodes.

    .venv/bin/python bench/soak.py --cluster --minutes 2 --fault-every 10,20

It prints a table and one line `SOAK-FIGURES {json}`, and exits 1 if a confirmed task was
lost. Everything it starts is its own, ended by pid; the whole run is capped in time. When
imported (as the worker processes do, `--app soak:project`) it only defines the project.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tenacity

from nobs_amqp import Project, Worker

REPO = Path(__file__).resolve().parents[1]
PROJECT = "nobs-soak"
QUEUE = "soak"
TIME_LIMIT = 2.0
DELIVERY_LIMIT = 4
LADDER = [f"{PROJECT}.delay.{level:02d}" for level in range(28)]


def make(url: str | list[str] | None = None) -> tuple[Project, Worker]:
    worker = Worker(
        QUEUE,
        concurrency=8,
        time_limit=TIME_LIMIT,
        stop=tenacity.stop_after_attempt(4),
        wait=tenacity.wait_exponential(multiplier=0.5, max=4),
        delivery_limit=DELIVERY_LIMIT,
    )
    return Project(name=PROJECT, workers=[worker], packages=["tests.apps"], url=url), worker


#: The project the worker processes load (`--app soak:project`, with bench/ on PYTHONPATH).
project, _ = make()

#: What the producer queues, by weight; `delay` is drawn separately.
MODES = {"ok": 880, "fail_once": 90, "hang": 10, "exit": 10, "crash_once": 4, "crash": 1}
#: Modes that end in the DLQ, and with which reason.
DEAD_BY_DESIGN = {"hang": "time_limit", "exit": "max_attempts", "crash": "delivery_limit"}
FAULTS = ["worker_sigkill", "worker_sigterm", "broker_kill9", "broker_restart"]


# -- bookkeeping ------------------------------------------------------------------------------


@dataclass
class Ledger:
    modes: dict[str, str] = field(default_factory=dict)  # key -> mode
    confirmed: dict[str, float] = field(default_factory=dict)  # key -> when
    failed: dict[str, str] = field(default_factory=dict)  # key -> error
    published: int = 0
    delayed: int = 0


@dataclass
class Faults:
    count: Counter[str] = field(default_factory=Counter)
    sigterm_exit_codes: list[int] = field(default_factory=list)
    sigterm_seconds: list[float] = field(default_factory=list)
    final_exit_codes: list[int] = field(default_factory=list)  # SIGTERM to every worker at the end
    broker_back: list[tuple[str, float, float]] = field(default_factory=list)  # (kind, down at, up at)
    unexpected_exits: Counter[str] = field(default_factory=Counter)  # exit code -> how often
    worker_starts: int = 0


class Workers:
    """The `nobs-amqp consume` processes: started, signalled, replaced and ended by pid."""

    def __init__(self, urls: list[str], folder: Path, faults: Faults) -> None:
        self.urls = urls  # every node's URL: each new worker starts on the next node
        self.folder = folder
        self.faults = faults
        self.procs: list[subprocess.Popen[bytes]] = []
        self.signalled: set[int] = set()  # pids we SIGKILLed or SIGTERMed on purpose

    def start(self) -> subprocess.Popen[bytes]:
        first = self.faults.worker_starts % len(self.urls)
        env = {
            **os.environ,
            "NOBS_AMQP_URL": ",".join(self.urls[first:] + self.urls[:first]),
            "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "bench")]),
        }
        command = [sys.executable, "-m", "nobs_amqp", "--app", "soak:project", "consume", QUEUE]
        command += ["--grace-period", "10"]
        self.faults.worker_starts += 1
        log = (self.folder / "logs" / f"worker-{self.faults.worker_starts}.log").open("ab")
        with log:
            proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def replace_dead(self) -> None:
        """Start a new worker for every one that exited by itself (a task crashed it)."""
        for proc in list(self.procs):
            code = proc.poll()
            if code is None:
                continue
            self.procs.remove(proc)
            if proc.pid not in self.signalled:
                self.faults.unexpected_exits[str(code)] += 1
            self.start()

    def sigkill(self, rng: random.Random) -> None:
        alive = [p for p in self.procs if p.poll() is None]
        if alive:
            victim = rng.choice(alive)
            self.signalled.add(victim.pid)
            victim.kill()
            victim.wait(10)

    async def sigterm(self, rng: random.Random) -> None:
        alive = [p for p in self.procs if p.poll() is None]
        if not alive:
            return
        victim = rng.choice(alive)
        self.signalled.add(victim.pid)
        signalled = time.monotonic()
        victim.send_signal(signal.SIGTERM)
        code = await self._exit_code(victim, 40)
        self.faults.sigterm_exit_codes.append(code)
        self.faults.sigterm_seconds.append(round(time.monotonic() - signalled, 2))

    async def _exit_code(self, proc: subprocess.Popen[bytes], timeout: float) -> int:
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.05) + 1):  # bounded polling of the process's exit
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        if proc.poll() is None:  # did not stop in time: counted as -1, then killed
            proc.kill()
            proc.wait(10)
            return -1
        return proc.returncode

    async def stop_all(self) -> list[int]:
        for proc in self.procs:
            if proc.poll() is None:
                self.signalled.add(proc.pid)
                proc.send_signal(signal.SIGTERM)
        return [await self._exit_code(proc, 40) for proc in self.procs]

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)


# -- producing --------------------------------------------------------------------------------


async def produce(
    worker: Worker, folder: Path, ledger: Ledger, stop: asyncio.Event, rng: random.Random, prefix: str
) -> None:
    """queue() tasks, paced, until `stop`; record what was confirmed and what raised."""
    from tests.apps import tasks

    modes, weights = list(MODES), list(MODES.values())
    sequence = 0
    while not stop.is_set():
        sequence += 1
        key = f"{prefix}-{sequence}"
        mode = rng.choices(modes, weights)[0]
        delay = rng.choice([1, 2, 5, 10, 20]) if rng.random() < 0.05 else None
        job = tasks.SoakJob(folder=str(folder), key=key, mode=mode, sleep=rng.choice([0.0, 0.0, 0.01, 0.05]))
        ledger.modes[key] = mode
        ledger.published += 1
        ledger.delayed += delay is not None
        try:
            await asyncio.wait_for(worker.queue(tasks.soak, job, delay=delay), 45)
        except Exception as exc:  # noqa: BLE001 - every outcome is recorded
            ledger.failed[key] = type(exc).__name__
            await asyncio.sleep(0.2)  # the broker is away: do not spin
        else:
            ledger.confirmed[key] = time.time()
            await asyncio.sleep(rng.uniform(0.02, 0.12))


# -- faults -----------------------------------------------------------------------------------


class Brokers:
    """The node(s) the soak runs on: one `Node`, or a `Cluster` whose nodes take the faults in turn."""

    def __init__(self, nodes: list[Any], cluster: Any = None) -> None:
        self.nodes = nodes
        self.cluster = cluster
        self.turn = 0

    def urls(self, first: int = 0) -> list[str]:
        """Every node's URL, node `first` (modulo their number) first."""
        first %= len(self.nodes)
        urls = [node.url for node in self.nodes]
        return urls[first:] + urls[:first]

    async def fault(self, kind: str) -> str:
        """Kill -9 or stop the next node, then start it again (and wait for its cluster); its label."""
        index = self.turn % len(self.nodes)
        self.turn += 1
        node = self.nodes[index]
        await (node.kill9() if kind == "broker_kill9" else node.stop())
        await (self.cluster.start(index) if self.cluster is not None else node.start())
        return f"{kind} node {index + 1}" if self.cluster is not None else kind

    async def start_all(self) -> None:
        """Start any node a fault left down."""
        for index, node in enumerate(self.nodes):
            if not node.running:
                await (self.cluster.start(index) if self.cluster is not None else node.start())


async def inject(
    brokers: Brokers, workers: Workers, faults: Faults, stop: asyncio.Event, rng: random.Random, every: list[float]
) -> None:
    """One fault every `every` (min, max) seconds (each kind in turn first, then at random) until `stop`."""
    order = [*FAULTS]
    rng.shuffle(order)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), rng.uniform(*every))
        if stop.is_set():
            return
        kind = order.pop() if order else rng.choice(FAULTS)
        faults.count[kind] += 1
        print(f"  {time.strftime('%H:%M:%S')} fault: {kind}", flush=True)
        if kind == "worker_sigkill":
            workers.sigkill(rng)
        elif kind == "worker_sigterm":
            await workers.sigterm(rng)
        else:
            down = time.time()
            label = await brokers.fault(kind)
            faults.broker_back.append((label, down, time.time()))
        workers.replace_dead()


async def supervise(workers: Workers, stop: asyncio.Event) -> None:
    """Replace workers that died by themselves (a crash task), every half second."""
    while not stop.is_set():
        workers.replace_dead()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


# -- reading what happened --------------------------------------------------------------------


def read_runs(folder: Path) -> dict[str, list[float]]:
    runs: dict[str, list[float]] = {}
    for path in folder.glob("runs.*"):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] == "ok":
                runs.setdefault(parts[0], []).append(float(parts[2]))
    return runs


async def depths(url: str, queues: list[str]) -> int:
    """Messages ready in `queues` (those that exist); -1 if the broker cannot say."""
    import aio_pika

    try:
        connection = await aio_pika.connect(url, timeout=5)
    except Exception:  # noqa: BLE001 - the broker is not back yet
        return -1
    total = 0
    try:
        for queue in queues:
            channel = await connection.channel()
            try:
                declared = await channel.declare_queue(queue, passive=True)
                total += int(declared.declaration_result.message_count or 0)
            except Exception:  # noqa: BLE001 - a level that does not exist holds nothing
                continue
            finally:
                if not channel.is_closed:
                    await channel.close()
    finally:
        await connection.close()
    return total


async def drain(url: str, folder: Path, ledger: Ledger, limit: float) -> float:
    """Wait (at most `limit` s) until the queue and the ladder are empty and no task has run
    for 5 s; return how long it took."""
    started = time.monotonic()
    last_runs, quiet_since = -1, time.monotonic()
    while time.monotonic() - started < limit:
        runs = sum(len(v) for v in read_runs(folder).values())
        if runs != last_runs:
            last_runs, quiet_since = runs, time.monotonic()
        elif time.monotonic() - quiet_since >= 5 and await depths(url, [QUEUE, *LADDER]) == 0:
            break
        await asyncio.sleep(1)
    return time.monotonic() - started


async def read_dlq(url: str) -> list[tuple[str, str]]:
    """(key, reason) of every dead letter, taken off the DLQ."""
    import aio_pika
    import orjson

    found: list[tuple[str, str]] = []
    connection = await aio_pika.connect(url, timeout=10)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(f"{QUEUE}.dlq", passive=True)
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            headers = dict(message.headers)
            deaths = headers.get("x-death")
            if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
                reason = f"broker:{deaths[0].get('reason')}"
            else:
                reason = str(headers.get("x-nobs-reason", "none"))
            found.append((str(orjson.loads(message.body).get("key")), reason))
    finally:
        await connection.close()
    return found


# -- figures ----------------------------------------------------------------------------------


def first_after(moments: list[float], after: float) -> float | None:
    later = [m for m in moments if m >= after]
    return round(min(later) - after, 2) if later else None


def longest_pause(moments: list[float], begin: float, end: float) -> float | None:
    """The longest time without an event that overlaps [begin, end]; None if none came after `begin`
    (on a cluster, how long producing or running stalled while a node was down: the failover)."""
    ordered = sorted(moments)
    if not ordered or ordered[-1] <= begin:
        return None
    return round(max((b - a for a, b in itertools.pairwise(ordered) if b > begin and a < end), default=0.0), 2)


def recoveries(faults: Faults, ledger: Ledger, runs: dict[str, list[float]]) -> list[dict[str, Any]]:
    confirms = list(ledger.confirmed.values())
    completions = [t for times in runs.values() for t in times]
    return [
        {
            "fault": kind,
            "broker_down_s": round(up - down, 2),
            "first_publish_after_s": first_after(confirms, up),
            "first_run_after_s": first_after(completions, up),
            "longest_publish_pause_s": longest_pause(confirms, down, up),
            "longest_run_pause_s": longest_pause(completions, down, up),
        }
        for kind, down, up in faults.broker_back
    ]


def figures(
    ledger: Ledger, faults: Faults, runs: dict[str, list[float]], dead: list[tuple[str, str]], times: dict[str, float]
) -> dict[str, Any]:
    dead_keys = Counter(key for key, _ in dead)
    lost = sorted(k for k in ledger.confirmed if k not in runs and k not in dead_keys)
    wrong = Counter(
        f"{ledger.modes[k]}->{reason}"
        for k, reason in dead
        if k in ledger.modes and DEAD_BY_DESIGN.get(ledger.modes[k]) != reason
    )
    return {
        "minutes_producing": round(times["produce"] / 60, 2),
        "published": ledger.published,
        "confirmed": len(ledger.confirmed),
        "not_confirmed": len(ledger.failed),
        "not_confirmed_errors": dict(Counter(ledger.failed.values())),
        "not_confirmed_that_ran": sum(1 for k in ledger.failed if k in runs),
        "delayed": ledger.delayed,
        "by_mode": dict(Counter(ledger.modes.values())),
        "tasks_that_ran": sum(1 for k in ledger.modes if k in runs),
        "runs": sum(len(v) for v in runs.values()),
        "duplicated_runs": sum(len(v) - 1 for v in runs.values()),
        "dead_lettered": len(dead),
        "dead_lettered_by_reason": dict(Counter(reason for _, reason in dead)),
        "dead_lettered_twice": sum(1 for n in dead_keys.values() if n > 1),
        "dead_lettered_not_by_design": dict(wrong),
        "lost": len(lost),
        "lost_examples": [f"{k} ({ledger.modes[k]})" for k in lost[:10]],
        "faults": dict(faults.count),
        "broker_recoveries": recoveries(faults, ledger, runs),
        "worker_sigterm_exit_codes": faults.sigterm_exit_codes,
        "worker_sigterm_seconds": faults.sigterm_seconds,
        "worker_exit_codes_at_end": faults.final_exit_codes,
        "worker_unexpected_exits_by_code": dict(faults.unexpected_exits),
        "worker_processes_started": faults.worker_starts,
        "seconds": {k: round(v, 1) for k, v in times.items()},
    }


def table(f: dict[str, Any]) -> str:
    rows = [
        ("producing (min)", f["minutes_producing"]),
        ("published", f["published"]),
        ("confirmed", f["confirmed"]),
        ("not confirmed (queue() raised)", f"{f['not_confirmed']} {f['not_confirmed_errors']}"),
        ("  of which ran anyway", f["not_confirmed_that_ran"]),
        ("tasks that ran", f["tasks_that_ran"]),
        ("runs / duplicated runs", f"{f['runs']} / {f['duplicated_runs']}"),
        ("dead-lettered", f"{f['dead_lettered']} {f['dead_lettered_by_reason']}"),
        ("dead-lettered not by design", f["dead_lettered_not_by_design"]),
        ("LOST (confirmed, never ran, not in DLQ)", f["lost"]),
        ("faults injected", f["faults"]),
        ("worker SIGTERM exit codes (faults)", f"{f['worker_sigterm_exit_codes']} in {f['worker_sigterm_seconds']} s"),
        ("worker SIGTERM exit codes (at the end)", f["worker_exit_codes_at_end"]),
        ("worker exits nobody asked for", f["worker_unexpected_exits_by_code"]),
        ("worker processes started", f["worker_processes_started"]),
    ]
    rows += [
        (
            f"recovery after {r['fault']}",
            f"down {r['broker_down_s']} s, first publish +{r['first_publish_after_s']} s, "
            f"first run +{r['first_run_after_s']} s; longest pause: publishing {r['longest_publish_pause_s']} s, "
            f"running {r['longest_run_pause_s']} s",
        )
        for r in f["broker_recoveries"]
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


# -- the run ----------------------------------------------------------------------------------


async def open_brokers(args: argparse.Namespace, stack: contextlib.AsyncExitStack) -> Brokers:
    """One throwaway node, or with --cluster three clustered ones; ended with `stack`."""
    sys.path.insert(0, str(REPO))
    if not args.cluster:
        from tests.nodes import Node

        return Brokers([await stack.enter_async_context(Node())])
    from tests.cluster import DLX_CONFIRM_TIMEOUT_MS, Cluster

    # 0: RabbitMQ's own 3 min, to see how long the ladder waits after a leader change by default.
    timeout = DLX_CONFIRM_TIMEOUT_MS if args.dlx_confirm_timeout_ms is None else args.dlx_confirm_timeout_ms or None
    cluster = await stack.enter_async_context(Cluster(dlx_confirm_timeout_ms=timeout))
    return Brokers(cluster.nodes, cluster)


async def soak(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    ledger, faults = Ledger(), Faults()
    times: dict[str, float] = {}
    async with contextlib.AsyncExitStack() as stack:
        brokers = await open_brokers(args, stack)
        workers = Workers(brokers.urls(), folder, faults)
        stack.callback(workers.kill_all)
        # On a cluster each producer has a connection of its own, to its own node first.
        producers = [make(brokers.urls(i)) for i in range(args.producers if args.cluster else 1)]
        for producer, _ in producers:
            await stack.enter_async_context(producer)
        await producers[0][0].session.declare(producers[0][1], delayed=True)
        for _ in range(args.workers):
            workers.start()
        stop = asyncio.Event()
        started = time.monotonic()
        background = [
            asyncio.create_task(inject(brokers, workers, faults, stop, rng, args.fault_every)),
            asyncio.create_task(supervise(workers, stop)),
            *(
                asyncio.create_task(
                    produce(
                        producers[i % len(producers)][1], folder, ledger, stop, random.Random(rng.random()), f"p{i}"
                    )
                )
                for i in range(args.producers)
            ),
        ]
        await asyncio.sleep(args.minutes * 60)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*background), 180)
        times["produce"] = time.monotonic() - started
        print(f"  {time.strftime('%H:%M:%S')} producing stopped; draining", flush=True)
        await brokers.start_all()  # in case a fault left one down
        watcher = asyncio.create_task(supervise(workers, asyncio.Event()))
        times["drain"] = await drain(brokers.urls()[0], folder, ledger, args.drain_seconds)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        faults.final_exit_codes = await workers.stop_all()
        dead = await read_dlq(brokers.urls()[0])
    result = figures(ledger, faults, read_runs(folder), dead, times)
    result["nodes"] = len(brokers.nodes)
    return result


def fault_every(text: str) -> list[float]:
    """`MIN,MAX` seconds between faults."""
    low, high = (float(part) for part in text.split(","))
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError("give MIN,MAX seconds with 0 < MIN <= MAX")
    return [low, high]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="how long to produce (default 5)")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--producers", type=int, default=3, help="concurrent queue() loops")
    parser.add_argument("--drain-seconds", type=float, default=180.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the run folder (worker logs, run files)")
    parser.add_argument("--cluster", action="store_true", help="three clustered nodes; node faults rotate over them")
    parser.add_argument(
        "--fault-every", type=fault_every, default=[15.0, 45.0], metavar="MIN,MAX", help="seconds (default 15,45)"
    )
    parser.add_argument(
        "--dlx-confirm-timeout-ms",
        type=int,
        default=None,
        help="--cluster: the nodes' dead_letter_worker_publisher_confirm_timeout (default: tests/cluster.py's; "
        "0: RabbitMQ's 3 min)",
    )
    args = parser.parse_args()
    args.seed = args.seed if args.seed is not None else random.randrange(10**6)
    cap = args.minutes * 60 + args.drain_seconds + 420  # node starts and restarts, shutdowns
    folder = Path(tempfile.mkdtemp(prefix="nobs-soak-"))
    (folder / "logs").mkdir()
    # The producer's reconnect warnings go to a file beside the workers' logs, not the terminal.
    logging.basicConfig(level=logging.WARNING, filename=folder / "logs" / "producer.log")
    where = "a three-node cluster" if args.cluster else "one node"
    print(f"soak: seed {args.seed}, {args.minutes} min, {args.workers} workers on {where}, folder {folder}", flush=True)
    try:
        result = asyncio.run(asyncio.wait_for(soak(args, folder), cap))
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    result["seed"] = args.seed
    print(table(result))
    print(f"SOAK-FIGURES {json.dumps(result, sort_keys=True)}")
    return 1 if result["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
