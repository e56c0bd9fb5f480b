"""What every adapter shares: the command line protocol, the payload, the done-counter, results.

An adapter is run with its own environment's Python:

    adapter.py produce --phase P --n N --queue Q --url URL   -> one JSON line on stdout
    adapter.py worker --queue Q --url URL [--tuned] [--fail-once]   (runs until SIGTERM)
    adapter.py count --queue Q --url URL   -> {"messages": ready count} (passive queue.declare)

The worker's task calls `task_done()` once per successful run: it appends one byte to a file
per process in $BENCH_COUNTER_DIR, which the harness sums every 50 ms to see the first and the
last task run without asking the broker (whose management statistics lag by up to 5 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
PRODUCE_PHASES = ("enqueue_sequential", "enqueue_concurrent", "enqueue_batched", "retry")


@dataclass(frozen=True)
class Args:
    command: str
    queue: str
    url: str
    phase: str = ""
    n: int = 0
    tuned: bool = False
    fail_once: bool = False


def parse(argv: list[str] | None = None) -> Args:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    produce = sub.add_parser("produce")
    produce.add_argument("--phase", required=True, choices=PRODUCE_PHASES)
    produce.add_argument("--n", type=int, required=True)
    worker = sub.add_parser("worker")
    worker.add_argument("--tuned", action="store_true")
    worker.add_argument("--fail-once", action="store_true")
    count = sub.add_parser("count")
    for p in (produce, worker, count):
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
    )
    # Task modules loaded by a system's CLI read their settings from the environment.
    os.environ.update(BENCH_QUEUE=args.queue, BENCH_URL=args.url)
    os.environ["BENCH_TUNED"] = "1" if args.tuned else ""
    os.environ["BENCH_FAIL_ONCE"] = "1" if args.fail_once else ""
    return args


def setting(name: str) -> str:
    return os.environ.get(name, "")


def payloads(phase: str, n: int) -> Iterator[dict[str, str]]:
    """The same payload N times; for the retry phase each one unique, so a task can tell them apart."""
    for i in range(n):
        yield {"email": f"{i}@b.c", "content": PAYLOAD["content"]} if phase == "retry" else PAYLOAD


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def split(n: int, parts: int) -> list[int]:
    """`n` spread over `parts` callers as evenly as possible."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


# -- the worker side -------------------------------------------------------------------------

_counter: tuple[int, int] | None = None  # (pid, fd)
_seen: set[str] = set()
_seen_lock = threading.Lock()


def task_done() -> None:
    """Count one successful task run (one byte appended to this process's counter file)."""
    global _counter
    if _counter is None or _counter[0] != os.getpid():
        folder = setting("BENCH_COUNTER_DIR")
        if not folder:
            return
        fd = os.open(f"{folder}/{os.getpid()}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        _counter = (os.getpid(), fd)
    os.write(_counter[1], b".")


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
) -> dict[str, object]:
    """Run an enqueue phase with an async client: one at a time, CALLERS concurrent callers,
    or chunks of BATCH (`batch`, else the chunk's publishes gathered: confirms awaited together)."""
    timer = Timer()
    if args.phase == "enqueue_sequential":
        for p in payloads(args.phase, args.n):
            await publish(p)
    elif args.phase == "enqueue_concurrent":

        async def caller(count: int) -> None:
            for p in payloads(args.phase, count):
                await publish(p)

        await asyncio.gather(*(caller(c) for c in split(args.n, CALLERS)))
    else:
        for chunk in chunks(list(payloads(args.phase, args.n)), BATCH):
            await (batch(chunk) if batch is not None else asyncio.gather(*(publish(p) for p in chunk)))
    return timer.result(args.n)


def drive_threads(
    args: Args, send: Callable[[Payload], Any], bulk: Callable[[list[Payload]], Any]
) -> dict[str, object]:
    """Run an enqueue phase with a sync client: one at a time, CALLERS threads, or `bulk` per chunk."""
    timer = Timer()
    if args.phase == "enqueue_sequential":
        for p in payloads(args.phase, args.n):
            send(p)
    elif args.phase == "enqueue_concurrent":

        def caller(count: int) -> None:
            for p in payloads(args.phase, count):
                send(p)

        threads = [threading.Thread(target=caller, args=(c,)) for c in split(args.n, CALLERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for chunk in chunks(list(payloads(args.phase, args.n)), BATCH):
            bulk(chunk)
    return timer.result(args.n)


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


def main(produce: Callable[[Args], dict[str, object]], worker: Callable[[Args], None]) -> None:
    args = parse()
    if args.command == "produce":
        emit(produce(args))
    elif args.command == "worker":
        worker(args)
    else:
        emit({"messages": count_messages(args.url, args.queue)})
