"""A three-node RabbitMQ cluster under load: the node holding a worker queue's quorum leader
killed -9 (twice), and a rolling restart. Producers and workers each have every node's URL,
their own node first.

The cluster starts once for the module (tests/cluster.py); each test has a vhost of its own.
Tasks record each run as a line in a file (tests.apps.tasks.soak), so runs are counted
across the worker subprocess and the in-process consumer. Each test prints one line
`CLUSTER-FIGURES {json}` for docs/RELIABILITY.md.

The nodes resend an unconfirmed dead letter after 5 s instead of RabbitMQ's 3 min
(tests/cluster.py, DLX_CONFIRM_TIMEOUT_MS): a delayed task whose ladder hop lost its confirm
with a leader would otherwise wait that long, past this group's time budget.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from subprocess import Popen
from typing import Any

import aio_pika
import orjson
import pytest
import tenacity

from nobs_amqp import NobsAmqpError, Project, Worker

from ..apps import tasks
from ..cluster import Cluster, cluster_or_skip
from ..support import APP, exit_code, output, process

pytestmark = [pytest.mark.rabbitmq, pytest.mark.cluster]

PROJECT = "nobs-test"  # tests.apps.cli_app's project: the worker subprocess and the producers share the ladder
MAX_ATTEMPTS = 3  # a task that always fails is in W.dlq after two retries (about 5 s)
DELIVERY_LIMIT = 10  # tests.apps.cli_app's default: a queue argument, so every client must agree
#: How long a fault waits for every client to work again while the node is still down (failover),
#: before it starts the node again (without failover, clients of that node wait for the restart).
FAILOVER_WAIT = 8.0
#: Every test in this group is bounded; the group as a whole must stay well under 2.5 minutes.
PRODUCE_LIMIT = 600  # queue() calls per producer at most
PACE = 0.1  # seconds between a producer's queue() calls: a few hundred tasks per test


@pytest.fixture(scope="module")
async def cluster() -> AsyncIterator[Cluster]:
    cluster_or_skip()
    async with Cluster() as started:
        yield started


@pytest.fixture
async def vhost(cluster: Cluster) -> AsyncIterator[str]:
    """A vhost of this test's own on the cluster, every node running (a failed test may have left one down)."""
    for index, node in enumerate(cluster.nodes):
        if not node.running:
            await cluster.start(index)
    name = f"cluster-{uuid.uuid4().hex[:8]}"
    await cluster.create_vhost(name)
    yield name
    await cluster.delete_vhost(name)


# -- the clients --------------------------------------------------------------------------------


def worker(name: str, **options: Any) -> Worker:
    return Worker(name, delivery_limit=DELIVERY_LIMIT, stop=tenacity.stop_after_attempt(MAX_ATTEMPTS), **options)


def client(urls: list[str], name: str, **options: Any) -> tuple[Project, Worker]:
    """A project with every node's URL (its own node first) and the worker `name`."""
    w = worker(name, **options)
    return Project(name=PROJECT, workers=[w], url=urls, packages=["tests.apps"]), w


@contextmanager
def worker_subprocess(urls: list[str], name: str, log: Path) -> Iterator[Popen[bytes]]:
    """`nobs-amqp consume name` of tests.apps.cli_app, given every node's URL (comma-separated)."""
    env = {
        "NOBS_AMQP_URL": ",".join(urls),
        "NOBS_TEST_WORKER": name,
        "NOBS_TEST_CONCURRENCY": "10",
        "NOBS_TEST_DELIVERY_LIMIT": str(DELIVERY_LIMIT),
        "NOBS_TEST_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    command = [sys.executable, "-m", "nobs_amqp", "--app", APP, "consume", name, "--grace-period", "5"]
    with process(command, env=env, log=log) as proc:
        yield proc


async def stop_worker(proc: Popen[bytes], log: Path) -> int:
    proc.send_signal(signal.SIGTERM)
    return await exit_code(proc, log, 30)


# -- what producers did and what ran ------------------------------------------------------------


@dataclass
class Ledger:
    """What every queue() call did: by key, its kind (ok, delayed, fail) and outcome."""

    kinds: dict[str, str] = field(default_factory=dict)
    confirmed: dict[str, float] = field(default_factory=dict)  # key -> wall time of the confirm
    failed: dict[str, BaseException] = field(default_factory=dict)
    failed_at: dict[str, float] = field(default_factory=dict)  # key -> wall time queue() raised
    by_producer: dict[str, list[float]] = field(default_factory=dict)  # producer -> confirm times

    def count(self, kind: str) -> int:
        return sum(1 for k in self.confirmed if self.kinds[k] == kind)


def kind_of(i: int) -> tuple[str, timedelta | None]:
    """Every 10th task delayed 2 to 4 s (through the ladder); three of the first 120 always fail."""
    if i in (7, 57, 107):
        return "fail", None
    if i % 10 == 5:
        return "delayed", timedelta(seconds=2 + i % 3)
    return "ok", None


async def produce(w: Worker, producer: str, folder: Path, ledger: Ledger, stop: asyncio.Event) -> None:
    """queue() one task after another, bounded in count, until `stop`; record each outcome."""
    times = ledger.by_producer.setdefault(producer, [])
    for i in range(PRODUCE_LIMIT):
        if stop.is_set():
            return
        key = f"{producer}-{i}"
        kind, delay = kind_of(i)
        ledger.kinds[key] = kind
        job = tasks.SoakJob(folder=str(folder), key=key, mode="exit" if kind == "fail" else "ok")
        try:
            # queue() retries through a lost connection for its publish timeout (30 s), then raises.
            await asyncio.wait_for(w.queue(tasks.soak, job, delay=delay), 45)
        except Exception as exc:  # noqa: BLE001 - every outcome is recorded and checked by the test
            ledger.failed[key] = exc
            ledger.failed_at[key] = time.time()
            await asyncio.sleep(0.1)  # the node is away: do not spin
        else:
            ledger.confirmed[key] = time.time()
            times.append(time.time())
            await asyncio.sleep(PACE)


def read_runs(folder: Path) -> dict[str, list[tuple[float, str]]]:
    """Each key's runs: (wall time, the pid of the process that ran it)."""
    runs: dict[str, list[tuple[float, str]]] = {}
    for path in folder.glob("runs.*"):
        pid = path.name.split(".", 1)[1]
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] == "ok":
                runs.setdefault(parts[0], []).append((float(parts[2]), pid))
    return runs


async def dead_letters(urls: list[str], name: str) -> list[str]:
    """The keys of the messages in `name`.dlq (taken off it), through the first node that answers."""
    connection = await aio_pika.connect(urls[0], timeout=10)
    keys = []
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(f"{name}.dlq", passive=True)
        for _ in range(1000):  # bounded: the DLQ of a test holds a handful
            message = await queue.get(no_ack=True, fail=False)
            if message is None:
                break
            keys.append(str(orjson.loads(message.body)["key"]))
    finally:
        await connection.close()
    return keys


def lost_keys(ledger: Ledger, runs: dict[str, Any], dead: list[str]) -> list[str]:
    """Confirmed tasks that did not run (ok, delayed) or are not in the DLQ (fail)."""

    def accounted(key: str) -> bool:
        return key in dead if ledger.kinds[key] == "fail" else key in runs

    return sorted(k for k in ledger.confirmed if not accounted(k))


def note(what: str) -> None:
    """A timestamped line of the scenario's progress (pytest shows it when the test fails)."""
    print(f"{time.strftime('%H:%M:%S')} {what}", flush=True)


async def until(check: Any, timeout: float, interval: float = 0.1) -> bool:
    """Poll `check()` until it is true or `timeout` passes; whether it came true (never fails)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(interval)
    return bool(check())


# -- recovery after a fault ---------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    node: int
    at: float  # wall time the kill or the stop began
    up: float = 0.0  # when the node answered again


def longest_pause(moments: list[float], begin: float, end: float) -> float | None:
    """The longest time without an event that overlaps [begin, end]; None if none came after `begin`."""
    ordered = sorted(moments)
    if not ordered or ordered[-1] <= begin:
        return None
    pauses = [b - a for a, b in itertools.pairwise(ordered) if b > begin and a < end]
    return round(max(pauses, default=0.0), 2)


def recovery(fault: Fault, ledger: Ledger, folder: Path) -> dict[str, Any]:
    """Each producer's and each consuming process's longest pause around `fault`: its failover time
    (or, for a client of the node that went away, without failover, the node's restart)."""
    by_consumer: dict[str, list[float]] = {}
    for key_runs in read_runs(folder).values():
        for at, pid in key_runs:
            by_consumer.setdefault(pid, []).append(at)
    pauses = {f"producer {p}": longest_pause(t, fault.at, fault.up) for p, t in ledger.by_producer.items()}
    pauses |= {f"consumer pid {pid}": longest_pause(t, fault.at, fault.up) for pid, t in by_consumer.items()}
    down = round(fault.up - fault.at, 2)
    raised = sorted(round(t - fault.at, 1) for t in ledger.failed_at.values() if fault.at <= t <= fault.up)
    return {
        "fault": fault.kind,
        "node": fault.node + 1,
        "node_down_s": down,
        "pause_s": pauses,
        "queue_raised_s_after": raised,
    }


def all_progressed(ledger: Ledger, folder: Path, since: float, consumers: int) -> bool:
    """Every producer confirmed and every consuming process ran a task after `since`."""
    producers = all(any(t > since for t in times) for times in ledger.by_producer.values())
    pids = {pid for runs in read_runs(folder).values() for at, pid in runs if at > since}
    return producers and len(pids) >= consumers


# -- figures ------------------------------------------------------------------------------------


def figures(
    scenario: str, ledger: Ledger, folder: Path, dead: list[str], faults: list[dict[str, Any]]
) -> dict[str, Any]:
    runs = read_runs(folder)
    ran = [k for k in ledger.kinds if k in runs]
    waits = [s for f in faults for s in f["pause_s"].values() if s is not None]
    return {
        "scenario": scenario,
        "sent": len(ledger.kinds),
        "confirmed": len(ledger.confirmed),
        "failed_with_error": len(ledger.failed),
        "failed_by_producer": dict(Counter(k.split("-")[0] for k in ledger.failed)),
        "errors": sorted({f"{type(e).__name__}: {e}"[:200] for e in ledger.failed.values()}),
        "unconfirmed_that_ran": sum(1 for k in ledger.failed if k in runs),
        "ran": len(ran),
        "delayed_ran": sum(1 for k in ran if ledger.kinds[k] == "delayed"),
        "dead_lettered": len(dead),
        "duplicates": sum(len(r) - 1 for r in runs.values()),
        "max_runs_of_a_task": max((len(r) for r in runs.values()), default=0),
        "lost": len(lost_keys(ledger, runs, dead)),
        "max_failover_s": max(waits, default=None),
        "faults": faults,
    }


def report(result: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        print(f"\nCLUSTER-FIGURES {json.dumps(result, sort_keys=True)}")


def check_outcome(scenario: Scenario, dead: list[str], result: dict[str, Any]) -> None:
    """Nothing confirmed was lost; delayed tasks ran; failing ones are in the DLQ; a queue() that
    raised said why; every client worked again while the node was still down (failover)."""
    check_errors(scenario.ledger)
    lost = lost_keys(scenario.ledger, read_runs(scenario.folder), dead)
    assert not lost, f"{len(lost)} confirmed tasks were lost, e.g. {lost[:5]}; worker log:\n{output(scenario.log)}"
    assert result["delayed_ran"] == scenario.ledger.count("delayed") > 0, result
    failing = [k for k in scenario.ledger.confirmed if scenario.ledger.kinds[k] == "fail"]
    assert failing and set(failing) <= set(dead), (failing, dead)
    # Only those: a task that should have run is never dead-lettered (a copy of a failing one may
    # be there twice: a dead letter whose original came back after a kill ran again elsewhere).
    assert set(dead) <= set(failing), {key: scenario.ledger.kinds.get(key) for key in set(dead) - set(failing)}
    stuck = [f for f in scenario.faults if not f["worked_while_down"]]
    assert not stuck, f"clients that waited for the node to come back instead of failing over: {stuck}"


def check_errors(ledger: Ledger) -> None:
    """A queue() that raised raised a nobs_amqp error that says what happened, without the password."""
    wrong = [f"{type(e).__name__}: {e}" for e in ledger.failed.values() if not isinstance(e, NobsAmqpError)]
    assert not wrong, f"queue() raised something other than a nobs_amqp error: {wrong[:3]}"
    for exc in ledger.failed.values():
        assert str(exc) and "guest:guest@" not in str(exc), str(exc)


# -- the scenarios ------------------------------------------------------------------------------


class Scenario:
    """Producers and consumers on a cluster for one test: `start`, then `fault`s, then `finish`."""

    def __init__(self, cluster: Cluster, vhost: str, folder: Path) -> None:
        self.cluster = cluster
        self.vhost = vhost
        self.folder = folder
        self.name = f"cl-{uuid.uuid4().hex[:8]}"
        self.ledger = Ledger()
        self.stop = asyncio.Event()
        self.faults: list[dict[str, Any]] = []
        self.consumers = 0
        self.log = folder / "worker.log"
        self.worker_proc: Popen[bytes] | None = None
        self.loops: list[asyncio.Task[None]] = []

    def urls(self, node: int) -> list[str]:
        return self.cluster.urls_for(self.vhost, first=node)

    async def start(self, stack: AsyncExitStack, producers: list[int], subprocess_on: int, consumer_on: int) -> None:
        """Declare through node `producers[0]` (its leader lands there), start a worker subprocess
        and an in-process consumer, then one producing loop per node in `producers`."""
        made = [client(self.urls(n), self.name) for n in producers]
        for project, _ in made:
            await stack.enter_async_context(project)
        await made[0][0].session.declare(made[0][1], delayed=True)
        self.worker_proc = stack.enter_context(worker_subprocess(self.urls(subprocess_on), self.name, self.log))
        consumer, consuming = client(self.urls(consumer_on), self.name, concurrency=10)
        await stack.enter_async_context(consumer)
        await stack.enter_async_context(consumer.consuming(consuming, grace_period=5))
        self.consumers = 2
        self.loops = [
            asyncio.create_task(produce(w, f"p{n + 1}", self.folder, self.ledger, self.stop))
            for n, (_, w) in zip(producers, made, strict=True)
        ]
        stack.push_async_callback(self.end_producers)

    async def end_producers(self) -> None:
        """Stop producing; each loop ends within one queue() (bounded by its 45 s)."""
        self.stop.set()
        await asyncio.wait_for(asyncio.gather(*self.loops), 60)

    async def confirmed_more(self, n: int, timeout: float = 30) -> None:
        target = len(self.ledger.confirmed) + n
        assert not all(loop.done() for loop in self.loops), "the producers stopped (PRODUCE_LIMIT?)"
        assert await until(lambda: len(self.ledger.confirmed) >= target, timeout), output(self.log)

    async def describe(self, pending: list[str]) -> None:
        """What the broker says about tasks that did not run (for the failure message)."""
        examples = [(k, self.ledger.kinds[k], round(self.ledger.confirmed[k] - time.time(), 1)) for k in pending[:5]]
        note(f"{len(pending)} confirmed tasks did not run, e.g. (key, kind, confirmed s ago) {examples}")
        info = await self.cluster.queue(self.vhost, self.name)
        fields = ("messages_ready", "messages_unacknowledged", "consumers", "leader", "online")
        note(f"queue {self.name}: { {f: info.get(f) for f in fields} }")

    async def fault(self, kind: str, node: int) -> None:
        """Kill -9 or stop node `node`; wait (bounded) for every client to work again while it is
        down; start it again; record how long each client took."""
        fault = Fault(kind, node, time.time())
        note(f"{kind} of node {node + 1} ({len(self.ledger.confirmed)} confirmed so far)")
        if kind == "kill -9":
            await self.cluster.kill9(node)
        else:
            await self.cluster.stop(node)

        def progressed() -> bool:
            return all_progressed(self.ledger, self.folder, fault.at, self.consumers)

        worked_while_down = await until(progressed, FAILOVER_WAIT)
        note(f"starting node {node + 1}")
        await self.cluster.start(node)
        fault.up = time.time()
        note(f"node {node + 1} is back")
        await self.cluster.wait_members_online(self.vhost, self.name)
        await until(progressed, 20)
        self.faults.append(recovery(fault, self.ledger, self.folder) | {"worked_while_down": worked_while_down})
        note(f"recovered: {self.faults[-1]}")

    async def finish(self, wait: float = 40) -> list[str]:
        """Stop producing, wait (bounded) until every confirmed task ran or is in the DLQ; the DLQ's keys."""
        await self.end_producers()
        note(f"producing stopped: {len(self.ledger.confirmed)} confirmed, {len(self.ledger.failed)} failed")
        dead: list[str] = []

        def pending() -> list[str]:
            runs = read_runs(self.folder)
            return [k for k in self.ledger.confirmed if self.ledger.kinds[k] != "fail" and k not in runs]

        await until(lambda: not pending(), wait, interval=0.2)
        if pending():
            await self.describe(pending())
        fails = self.ledger.count("fail")
        for _ in range(40):  # the failing tasks reach the DLQ after their retries (bounded: 40 × 0.5 s)
            dead += await dead_letters(self.urls(0), self.name)
            if len(dead) >= fails:
                break
            await asyncio.sleep(0.5)
        assert self.worker_proc is not None
        code = await stop_worker(self.worker_proc, self.log)
        assert code == 0, output(self.log)
        return dead


@pytest.mark.timeout(100)
async def test_killing_the_quorum_leaders_node_under_load_loses_nothing(
    cluster: Cluster, vhost: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = Scenario(cluster, vhost, tmp_path)
    async with AsyncExitStack() as stack:
        # Producers on nodes 1 and 2; the worker subprocess on node 1, the in-process consumer on node 2.
        await scenario.start(stack, producers=[0, 1], subprocess_on=0, consumer_on=1)
        for _ in range(2):
            await scenario.confirmed_more(40)
            await cluster.wait_members_online(vhost, scenario.name)
            leader = cluster.index_of(await cluster.leader(vhost, scenario.name))
            await scenario.fault("kill -9", leader)
        await scenario.confirmed_more(40)
        dead = await scenario.finish()
    result = figures(
        "quorum leader's node killed -9 twice under load", scenario.ledger, tmp_path, dead, scenario.faults
    )
    report(result, capsys)
    check_outcome(scenario, dead, result)


@pytest.mark.timeout(100)
async def test_a_rolling_restart_loses_nothing(
    cluster: Cluster, vhost: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = Scenario(cluster, vhost, tmp_path)
    async with AsyncExitStack() as stack:
        # One producer on node 1, the worker subprocess on node 2, the in-process consumer on node 3.
        await scenario.start(stack, producers=[0], subprocess_on=1, consumer_on=2)
        for node in range(len(cluster.nodes)):
            await scenario.confirmed_more(30)
            await scenario.fault("graceful restart", node)
        await scenario.confirmed_more(30)
        dead = await scenario.finish()
    result = figures(
        "rolling restart (each node stopped and started)", scenario.ledger, tmp_path, dead, scenario.faults
    )
    report(result, capsys)
    check_outcome(scenario, dead, result)
    # README: "a crash at any point at worst runs a task twice"; each task meets one restart at most.
    assert result["max_runs_of_a_task"] <= 2, result


@pytest.mark.timeout(60)
async def test_every_quorum_queue_the_project_declares_is_replicated(cluster: Cluster, vhost: str) -> None:
    """Worker queues, DLQs, the delay ladder and its unroutable queue: on all three nodes with the
    default `replicas=3`; `replicas=1` puts a new queue on one node only."""
    three = Worker(f"replicated-{uuid.uuid4().hex[:6]}")
    project = Project(name="nobs-replicated", workers=[three], url=cluster.urls_for(vhost), packages=["tests.apps"])
    async with project:
        await project.session.declare(three, delayed=True)
        queues = [queue.name for queue in project.topology().queues]
    one = Worker(f"single-{uuid.uuid4().hex[:6]}")
    small = Project(
        name="nobs-single", workers=[one], url=cluster.urls_for(vhost, first=2), packages=["tests.apps"], replicas=1
    )
    async with small:
        await small.session.declare(one, delayed=False)
    assert {three.name, f"{three.name}.dlq", "nobs-replicated.delay.00", "nobs-replicated.delay.27"} <= set(queues)
    everywhere = sorted(cluster.names())
    for name in queues:
        info = await cluster.queue(vhost, name)
        assert info["type"] == "quorum", (name, info["type"])
        assert sorted(info["members"]) == everywhere, (name, info["members"])
        assert info["arguments"]["x-quorum-initial-group-size"] == 3, (name, info["arguments"])
    for name in (one.name, f"{one.name}.dlq"):
        assert len((await cluster.queue(vhost, name))["members"]) == 1, name
