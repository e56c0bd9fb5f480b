"""What every adapter shares: the command line protocol, the payload, the done-counter, results.

An adapter is run with its own environment's Python:

    adapter.py produce --phase P --n N --queue Q --url URL [--size B]   -> one JSON line on stdout
    adapter.py produce --phase latency --rate R --seconds S --queue Q --url URL   (paced, open loop)
    adapter.py worker --queue Q --url URL [--tuned] [--fail-once]   (runs until SIGTERM)
    adapter.py count --queue Q --url URL   -> {"messages": ready count} (passive queue.declare)

An adapter may add commands of its own (nobs_amqp: `scale`, `dlq`), each printing one JSON line.

The worker's task calls `task_done(email)` once per successful run: it appends one byte to a file
per process in $BENCH_COUNTER_DIR, which the harness sums every 50 ms to see the first and the
last task run without asking the broker (whose management statistics lag by up to 5 s). A paced
producer stamps each payload's `email` with the wall-clock time it called the system's enqueue
(and the delay it asked for); the task then appends "<seconds late> <delay>" to a file per process
in $BENCH_LATENCY_DIR: how long after it was asked for (plus its delay) the task started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue as queues
import random
import resource
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LIB = Path(__file__).resolve().parent
PAYLOAD: dict[str, str] = {"email": "a@b.c", "content": "x" * 100}
CALLERS = 100  # concurrent callers in enqueue_concurrent
BATCH = 1000  # messages per bulk call in enqueue_batched
RETRY_DELAY = 1.0  # seconds before the retry of a task that failed once
PACED_PHASES = ("latency", "delayed")
PRODUCE_PHASES = ("enqueue_sequential", "enqueue_concurrent", "enqueue_batched", "retry", *PACED_PHASES)
MAX_IN_FLIGHT = 1000  # a paced async producer's publishes awaiting their confirm at once
SENDERS = 32  # a paced sync producer's sender threads
STAMP = "lat:"  # an `email` that starts with it carries "<wall-clock time>:<delay>" for the latency files


@dataclass(frozen=True)
class Args:
    command: str
    queue: str
    url: str
    phase: str = ""
    n: int = 0
    tuned: bool = False
    fail_once: bool = False
    size: int = len(PAYLOAD["content"])
    rate: float = 0.0
    seconds: float = 0.0
    delay_max: int = 0
    load_rate: float = 0.0
    extra: dict[str, Any] | None = None  # an adapter command's own options


#: An adapter's own command: its options ((flag, type) pairs) and what runs it (returns the JSON result).
Command = tuple[tuple[tuple[str, type], ...], Callable[["Args"], dict[str, object]]]


def parse(argv: list[str] | None = None, commands: dict[str, Command] | None = None) -> Args:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    produce = sub.add_parser("produce")
    produce.add_argument("--phase", required=True, choices=PRODUCE_PHASES)
    produce.add_argument("--n", type=int, default=0)
    produce.add_argument("--size", type=int, default=len(PAYLOAD["content"]), help="characters of `content`")
    produce.add_argument("--rate", type=float, default=0.0, help="paced phases: tasks per second")
    produce.add_argument("--seconds", type=float, default=0.0, help="latency: how long to produce")
    produce.add_argument("--delay-max", type=int, default=0, help="delayed: delays are 1..this many seconds")
    produce.add_argument("--load-rate", type=float, default=0.0, help="delayed: immediate tasks per second beside")
    worker = sub.add_parser("worker")
    worker.add_argument("--tuned", action="store_true")
    worker.add_argument("--fail-once", action="store_true")
    count = sub.add_parser("count")
    own = {}
    for name, (options, _) in (commands or {}).items():
        own[name] = sub.add_parser(name)
        for flag, kind in options:
            own[name].add_argument(flag, type=kind, required=True)
    for p in (produce, worker, count, *own.values()):
        p.add_argument("--queue", required=True)
        p.add_argument("--url", required=True)
    ns = parser.parse_args(argv)
    args = Args(
        ns.command,
        ns.queue,
        ns.url,
        getattr(ns, "phase", ""),
        getattr(ns, "n", 0),
        getattr(ns, "tuned", False),
        getattr(ns, "fail_once", False),
        getattr(ns, "size", len(PAYLOAD["content"])),
        getattr(ns, "rate", 0.0),
        getattr(ns, "seconds", 0.0),
        getattr(ns, "delay_max", 0),
        getattr(ns, "load_rate", 0.0),
        {
            flag.lstrip("-").replace("-", "_"): getattr(ns, flag.lstrip("-").replace("-", "_"))
            for flag, _ in (commands or {}).get(ns.command, ((), None))[0]
        },
    )
    # Task modules loaded by a system's CLI read their settings from the environment.
    os.environ.update(BENCH_QUEUE=args.queue, BENCH_URL=args.url)
    os.environ["BENCH_TUNED"] = "1" if args.tuned else ""
    os.environ["BENCH_FAIL_ONCE"] = "1" if args.fail_once else ""
    return args


def setting(name: str) -> str:
    return os.environ.get(name, "")


def payload(size: int = len(PAYLOAD["content"]), email: str = PAYLOAD["email"]) -> dict[str, str]:
    """The benchmark's payload, with `size` characters of content (100 by default)."""
    if size == len(PAYLOAD["content"]) and email == PAYLOAD["email"]:
        return PAYLOAD
    return {"email": email, "content": "x" * size}


def payloads(phase: str, n: int, size: int = len(PAYLOAD["content"])) -> Iterator[dict[str, str]]:
    """The same payload N times; for the retry phase each one unique, so a task can tell them apart."""
    same = payload(size)
    for i in range(n):
        yield payload(size, f"{i}@b.c") if phase == "retry" else same


def stamped(size: int, delay: int = 0) -> dict[str, str]:
    """A payload that tells the task when it was asked for (now, wall clock) and with what delay."""
    return payload(size, f"{STAMP}{time.time():.6f}:{delay}@b.c")


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def split(n: int, parts: int) -> list[int]:
    """`n` spread over `parts` callers as evenly as possible."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


# -- the worker side -------------------------------------------------------------------------

_files: dict[str, tuple[int, int]] = {}  # variable -> (pid, fd) of this process's file in that folder
_seen: set[str] = set()
_seen_lock = threading.Lock()
ran = 0  # tasks this process ran (for adapters that consume in-process)


def _append(variable: str, data: bytes) -> None:
    """Append `data` to this process's file in the folder $`variable` names (nothing without one)."""
    known = _files.get(variable)
    if known is None or known[0] != os.getpid():
        folder = setting(variable)
        if not folder:
            return
        fd = os.open(f"{folder}/{os.getpid()}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        known = _files[variable] = (os.getpid(), fd)
    os.write(known[1], data)


def task_done(email: str = "") -> None:
    """Count one successful task run (one byte appended to this process's counter file); for a
    stamped payload, also how late it started."""
    global ran
    now = time.time()
    ran += 1
    _append("BENCH_COUNTER_DIR", b".")
    if email.startswith(STAMP):
        stamp, _, delay = email[len(STAMP) :].partition("@")[0].partition(":")
        _append("BENCH_LATENCY_DIR", f"{now - float(stamp) - int(delay):.6f} {delay}\n".encode())


def fail_once_enabled() -> bool:
    return setting("BENCH_FAIL_ONCE") == "1"


def tuned() -> bool:
    return setting("BENCH_TUNED") == "1"


def first_time(key: str) -> bool:
    """True the first time this process sees `key` (for systems that do not tell a task its attempt)."""
    with _seen_lock:
        if key in _seen:
            return False
        _seen.add(key)
        return True


class FailOnceError(Exception):
    """Raised by the benchmark task on a message's first attempt in the retry phase."""


def exec_cli(argv: list[str]) -> None:
    """Replace this process by a system's worker CLI, with the task modules importable."""
    path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = str(LIB) + (os.pathsep + path if path else "")
    os.chdir(LIB)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *argv])


# -- results ---------------------------------------------------------------------------------


class Timer:
    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def result(self, n: int, **extra: object) -> dict[str, object]:
        return {
            "seconds": time.perf_counter() - self.wall,
            "cpu_seconds": time.process_time() - self.cpu,
            "messages": n,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            **extra,
        }


Payload = dict[str, str]


async def drive_async(
    args: Args,
    publish: Callable[[Payload], Coroutine[Any, Any, Any]],
    batch: Callable[[list[Payload]], Coroutine[Any, Any, Any]] | None = None,
    delayed: Callable[[Payload, int], Coroutine[Any, Any, Any]] | None = None,
) -> dict[str, object]:
    """Run an enqueue phase with an async client: one at a time, CALLERS concurrent callers,
    or chunks of BATCH (`batch`, else the chunk's publishes gathered: confirms awaited together);
    or a paced phase (`delayed` publishes with a delay in seconds, for those that can)."""
    if args.phase in PACED_PHASES:
        if args.phase == "delayed" and delayed is None:
            raise SystemExit("this adapter has no delayed publish")

        def paced(p: Payload, delay: int) -> Coroutine[Any, Any, Any]:
            return delayed(p, delay) if delay and delayed is not None else publish(p)

        return await drive_paced_async(args, paced)
    timer = Timer()
    if args.phase == "enqueue_sequential":
        for p in payloads(args.phase, args.n, args.size):
            await publish(p)
    elif args.phase == "enqueue_concurrent":

        async def caller(count: int) -> None:
            for p in payloads(args.phase, count, args.size):
                await publish(p)

        await asyncio.gather(*(caller(c) for c in split(args.n, CALLERS)))
    else:
        for chunk in chunks(list(payloads(args.phase, args.n, args.size)), BATCH):
            await (batch(chunk) if batch is not None else asyncio.gather(*(publish(p) for p in chunk)))
    return timer.result(args.n)


def drive_threads(
    args: Args, send: Callable[[Payload], Any], bulk: Callable[[list[Payload]], Any]
) -> dict[str, object]:
    """Run an enqueue phase with a sync client: one at a time, CALLERS threads, or `bulk` per chunk;
    or the latency phase (paced)."""
    if args.phase in PACED_PHASES:
        if args.phase == "delayed":
            raise SystemExit("this adapter has no delayed publish")
        return drive_paced_threads(args, lambda p, _delay: send(p))
    return _drive_threads(args, send, bulk)


def _drive_threads(
    args: Args, send: Callable[[Payload], Any], bulk: Callable[[list[Payload]], Any]
) -> dict[str, object]:
    timer = Timer()
    if args.phase == "enqueue_sequential":
        for p in payloads(args.phase, args.n, args.size):
            send(p)
    elif args.phase == "enqueue_concurrent":

        def caller(count: int) -> None:
            for p in payloads(args.phase, count, args.size):
                send(p)

        threads = [threading.Thread(target=caller, args=(c,)) for c in split(args.n, CALLERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for chunk in chunks(list(payloads(args.phase, args.n, args.size)), BATCH):
            bulk(chunk)
    return timer.result(args.n)


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    """count, p50, p90, p99, max and mean of `values` (nearest rank)."""
    ordered = sorted(values)
    if not ordered:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]

    return {
        "count": len(ordered),
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "max": ordered[-1],
        "mean": sum(ordered) / len(ordered),
    }


def schedule(args: Args) -> list[tuple[float, int]]:
    """(seconds after the start, delay) of each task a paced phase sends, in order.

    latency: `rate` per second for `seconds`, no delay. delayed: `n` tasks at `rate` per second,
    each delayed 1..`delay_max` s (seeded, so every run asks for the same delays), and with
    `load_rate`, immediate tasks at that rate until the last delayed one is due (plus 1 s)."""
    if args.phase == "latency":
        return [(i / args.rate, 0) for i in range(round(args.rate * args.seconds))]
    draw = random.Random(13)
    events = [(i / args.rate, draw.randint(1, args.delay_max)) for i in range(args.n)]
    if args.load_rate > 0:
        span = args.n / args.rate + args.delay_max + 1
        events += [(i / args.load_rate, 0) for i in range(round(args.load_rate * span))]
    return sorted(events)


def _paced_result(
    timer: Timer, events: list[tuple[float, int]], durations: list[float], lags: list[float], **extra: object
) -> dict[str, object]:
    return timer.result(
        len(events),
        delayed=sum(1 for _, d in events if d),
        queue_seconds=percentiles(durations),
        lag_seconds=percentiles(lags),
        **extra,
    )


async def drive_paced_async(
    args: Args, publish: Callable[[Payload, int], Coroutine[Any, Any, Any]]
) -> dict[str, object]:
    """Send the phase's schedule open loop: each task in its own asyncio task at its time, whatever
    the earlier ones are doing (at most MAX_IN_FLIGHT at once). One unstamped publish goes first
    (connection, channel pool, declarations); it is not timed and counts as `warmup`."""
    await publish(payload(args.size), 0)
    events = schedule(args)
    durations: list[float] = []
    lags: list[float] = []
    slots = asyncio.Semaphore(MAX_IN_FLIGHT)
    running: set[asyncio.Task[None]] = set()

    async def one(due: float, delay: int) -> None:
        try:
            lags.append(time.perf_counter() - due)
            body = stamped(args.size, delay)
            started = time.perf_counter()
            await publish(body, delay)
            durations.append(time.perf_counter() - started)
        finally:
            slots.release()

    timer = Timer()
    began = time.time()
    start = time.perf_counter()
    for offset, delay in events:
        wait = start + offset - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        await slots.acquire()
        task = asyncio.create_task(one(start + offset, delay))
        running.add(task)
        task.add_done_callback(running.discard)
    ended = time.time()
    for task in list(running):
        await task
    return _paced_result(timer, events, durations, lags, warmup=1, paced_from=began, paced_to=ended)


class _Senders:
    """SENDERS threads that send what the dispatcher hands them, timing each send."""

    def __init__(self, args: Args, send: Callable[[Payload, int], Any]) -> None:
        self.args, self.send = args, send
        self.durations: list[float] = []
        self.lags: list[float] = []
        self.errors: list[BaseException] = []
        self.handoff: queues.Queue[tuple[float, int] | None] = queues.Queue()
        self.warm = threading.Barrier(SENDERS + 1)
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(SENDERS)]
        for t in self.threads:
            t.start()
        self.warm.wait()

    def _send(self, body: Payload, delay: int) -> None:
        try:
            self.send(body, delay)
        except BaseException as exc:  # noqa: BLE001 - raised by close()
            self.errors.append(exc)

    def _run(self) -> None:
        self._send(payload(self.args.size), 0)
        self.warm.wait()
        while (item := self.handoff.get()) is not None:
            if self.errors:
                continue
            due, delay = item
            self.lags.append(time.perf_counter() - due)
            body = stamped(self.args.size, delay)
            started = time.perf_counter()
            self._send(body, delay)
            self.durations.append(time.perf_counter() - started)

    def close(self) -> None:
        for _ in self.threads:
            self.handoff.put(None)
        for t in self.threads:
            t.join()
        if self.errors:
            raise self.errors[0]


def drive_paced_threads(args: Args, send: Callable[[Payload, int], Any]) -> dict[str, object]:
    """The same for a sync client: a dispatcher hands each task at its time to SENDERS threads
    (each sends one unstamped warm-up message first: some clients open a connection per thread)."""
    events = schedule(args)
    senders = _Senders(args, send)
    timer = Timer()
    began = time.time()
    start = time.perf_counter()
    for offset, delay in events:
        wait = start + offset - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        senders.handoff.put((start + offset, delay))
    ended = time.time()
    senders.close()
    return _paced_result(
        timer, events, senders.durations, senders.lags, warmup=SENDERS, paced_from=began, paced_to=ended
    )


def emit(result: dict[str, object]) -> None:
    print(json.dumps(result), flush=True)


def run_async(main: Callable[[], Coroutine[Any, Any, Any]], *, use_uvloop: bool = True) -> tuple[Any, str]:
    """Run `main()` on uvloop when installed and wanted (as uvicorn does), else asyncio; the loop's name too."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main()), "uvloop"
    return asyncio.run(main()), "asyncio"


# -- count: a passive queue.declare with whatever AMQP client the environment has ------------


def count_messages(url: str, queue: str) -> int:
    try:
        import aio_pika
    except ImportError:
        pass
    else:

        async def passive() -> int:
            connection = await aio_pika.connect(url)
            async with connection:
                declared = await (await connection.channel()).declare_queue(queue, passive=True)
                return int(declared.declaration_result.message_count or 0)

        return int(asyncio.run(passive()))
    try:
        import pika
    except ImportError:
        pass
    else:
        blocking = pika.BlockingConnection(pika.URLParameters(url))
        try:
            return int(blocking.channel().queue_declare(queue, passive=True).method.message_count)
        finally:
            blocking.close()
    from kombu import Connection

    with Connection(url) as conn:
        return int(conn.default_channel.queue_declare(queue, passive=True).message_count)


def main(
    produce: Callable[[Args], dict[str, object]],
    worker: Callable[[Args], None],
    commands: dict[str, Command] | None = None,
) -> None:
    args = parse(commands=commands)
    if args.command == "produce":
        emit(produce(args))
    elif args.command == "worker":
        worker(args)
    elif args.command == "count":
        emit({"messages": count_messages(args.url, args.queue)})
    else:
        emit((commands or {})[args.command][1](args))
