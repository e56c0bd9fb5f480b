"""nobs_amqp adapter: `await worker.queue()` / `queue_many()`; the worker is the `nobs_amqp consume` CLI.

Its own commands (issue 13's growth tables):

    nobs_amqp.py scale --workers N --queue Q --url URL        a project of N workers: open, first and
        warm publish per worker, `consume` start-up of one of them, in-process start-up of all of them
    nobs_amqp.py dlq --dead-letters N --queue Q --url URL     N dead letters in Q.dlq, then the time of
        `nobs-amqp dlq list`, `dlq show` (of the last one) and `dlq replay`, each as its own process
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path[0] = str(Path(__file__).resolve().parent / "lib")  # this file's name must not shadow the library

import benchcommon as bc  # noqa: E402

TUNED = {"prefetch": 100, "concurrency": 50}
CLI = ["-m", "nobs_amqp", "--app", "nobs_tasks:project"]
POLL = 0.01  # seconds between looks at a CLI process
STOP_GRACE = 15.0


def produce(args: bc.Args) -> dict[str, object]:
    import nobs_tasks as t

    async def run() -> dict[str, object]:
        async with t.project:
            return await bc.drive_async(
                args,
                lambda p: t.worker.queue(t.send_email, t.SendEmail(**p)),
                lambda chunk: t.worker.queue_many(t.send_email, [t.SendEmail(**p) for p in chunk]),
                lambda p, delay: t.worker.queue(t.send_email, t.SendEmail(**p), delay=delay),
            )

    result, loop = bc.run_async(run)
    return {**result, "loop": loop}


def worker(args: bc.Args) -> None:
    argv = ["-m", "nobs_amqp", "--app", "nobs_tasks:project", "consume", args.queue]
    if args.tuned:
        argv += [f"--{option}={value}" for option, value in TUNED.items()]
    bc.exec_cli(argv)


# -- the CLI as its own process ------------------------------------------------------------------


def _cli_env(**extra: str) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": str(bc.LIB) + (os.pathsep + path if path else ""), **extra}


def _vm_hwm_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def timed_cli(argv: list[str], timeout: float) -> dict[str, Any]:
    """Run `python -m nobs_amqp --app nobs_tasks:project ARGV` to its end: wall seconds, its peak RSS
    (from wait4), its exit code and output."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, *CLI, *argv], stdout=out, stderr=err, cwd=bc.LIB, env=_cli_env(), start_new_session=True
        )
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - started > timeout:
                os.killpg(process.pid, signal.SIGKILL)
                os.wait4(process.pid, 0)
                process.returncode = -9
                raise SystemExit(f"`nobs-amqp {' '.join(argv)}` took more than {timeout:.0f} s")
            time.sleep(POLL)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if process.returncode != 0:
        tail = " | ".join(stderr.strip().splitlines()[-3:])
        raise SystemExit(f"`nobs-amqp {' '.join(argv)}` exited {process.returncode}: {tail}")
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024, "stdout": stdout, "stderr": stderr}


def consume_until(name: str, expected: int, timeout: float, **env: str) -> dict[str, Any]:
    """Start `nobs-amqp consume NAME`, time it from start to `expected` task runs, stop it (SIGTERM)."""
    with tempfile.TemporaryDirectory() as counter, tempfile.TemporaryFile() as log:
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, *CLI, "consume", name],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=bc.LIB,
            env=_cli_env(BENCH_COUNTER_DIR=counter, **env),
            start_new_session=True,
        )
        first = done = None
        rss = None
        try:
            while (now := time.perf_counter() - started) < timeout and process.poll() is None:
                ran = sum(entry.stat().st_size for entry in os.scandir(counter))
                if first is None and ran:
                    first = now
                if ran >= expected:
                    done = now
                    break
                time.sleep(POLL)
            rss = _vm_hwm_mib(process.pid)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(STOP_GRACE)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        if done is None:
            log.seek(0)
            tail = " | ".join(log.read().decode(errors="replace").strip().splitlines()[-3:])
            raise SystemExit(f"`consume {name}` ran fewer than {expected} tasks in {timeout:.0f} s: {tail}")
    return {"first_task": first, "seconds": done, "peak_rss_mib": rss}


# -- scale: a project of N workers -----------------------------------------------------------------


def scale(args: bc.Args) -> dict[str, object]:
    n = int((args.extra or {})["workers"])
    os.environ["BENCH_WORKERS"] = str(n)
    import nobs_tasks as t

    payload = t.SendEmail(**bc.PAYLOAD)

    async def publish() -> dict[str, Any]:
        started = time.perf_counter()
        async with t.project:
            opened = time.perf_counter() - started
            first, warm = [], []
            for times in (first, warm):  # first: declares the worker's topology; warm: it is declared
                for w in t.workers:
                    begun = time.perf_counter()
                    await w.queue(t.send_email, payload)
                    times.append(time.perf_counter() - begun)
        return {
            "open_seconds": opened,
            "first_publish_all_seconds": sum(first),
            "first_publish": bc.percentiles(first),
            "warm_publish": bc.percentiles(warm),
        }

    published = bc.run_async(publish, use_uvloop=False)[0]
    # One worker of the project as its own `consume` process: its two messages.
    cli = consume_until(t.workers[0].name, 2, 60 + n, BENCH_WORKERS=str(n))

    async def consume_all() -> dict[str, Any]:
        expected = 2 * (n - 1)  # the first worker's queue was drained above
        started = time.perf_counter()
        async with t.project:
            async with t.project.consuming():  # enters once every worker's consumer is ready
                ready = time.perf_counter() - started
                while bc.ran < expected and time.perf_counter() - started < 60 + n:  # noqa: ASYNC110 - a counter
                    await asyncio.sleep(POLL)
                all_ran = time.perf_counter() - started
            if bc.ran < expected:
                raise SystemExit(f"in-process consuming ran {bc.ran} of {expected} tasks in {all_ran:.0f} s")
        return {"consume_all_ready_seconds": ready, "consume_all_ran_seconds": all_ran}

    consumed = bc.run_async(consume_all, use_uvloop=False)[0]
    return {
        "workers": n,
        **published,
        "cli_first_task_seconds": cli["first_task"],
        "cli_peak_rss_mib": cli["peak_rss_mib"],
        **consumed,
        "peak_rss_mib": bc.Timer().result(0)["peak_rss_mib"],
    }


# -- dlq: the CLI against a deep dead-letter queue ---------------------------------------------------


def dlq(args: bc.Args) -> dict[str, object]:
    import nobs_tasks as t

    from nobs_amqp import message as wire

    n = int((args.extra or {})["dead_letters"])

    async def fill() -> tuple[float, str]:
        async with t.project:
            session = t.project.session
            spec = t.project.spec(t.send_email)
            body = spec.encode(t.SendEmail(**bc.PAYLOAD))
            started = time.perf_counter()
            last = ""
            for chunk in bc.chunks(list(range(n)), bc.BATCH):
                letters = [
                    wire.dead_letter_copy(
                        wire.new_message(body, spec.reference, t.project.name, now=session.now()),
                        wire.Reason.REJECTED,
                        "bench: dead on purpose",
                        now=session.now(),
                    )
                    for _ in chunk
                ]
                await asyncio.gather(*(session.dead_letter(t.worker, letter) for letter in letters))
                last = letters[-1].message_id
            return time.perf_counter() - started, last

    filled, last = bc.run_async(fill, use_uvloop=False)[0]
    timeout = 60 + n * 0.005
    start_only = timed_cli(["--help"], timeout)
    listed = timed_cli(["dlq", "list", args.queue], timeout)
    shown = timed_cli(["dlq", "show", args.queue, last], timeout)
    replayed = timed_cli(["dlq", "replay", args.queue], timeout)
    moved = re.search(r"replayed (\d+)", replayed["stdout"])
    if moved is None or int(moved.group(1)) != n:
        raise SystemExit(f"dlq replay said {replayed['stdout'].strip()!r}, not {n} replayed")
    back = bc.count_messages(args.url, args.queue)
    if back != n:
        raise SystemExit(f"{back} messages in {args.queue} after replaying {n} dead letters")
    if f"message id: {last}" not in shown["stdout"]:
        raise SystemExit("dlq show did not show the last dead letter")

    def brief(result: dict[str, Any]) -> dict[str, float]:
        return {"seconds": result["seconds"], "peak_rss_mib": result["peak_rss_mib"]}

    return {
        "dead_letters": n,
        "fill_seconds": filled,
        "cli_start": brief(start_only),
        "list": brief(listed),
        "show": brief(shown),
        "replay": brief(replayed),
        "replayed": n,
    }


if __name__ == "__main__":
    bc.main(
        produce,
        worker,
        {"scale": ((("--workers", int),), scale), "dlq": ((("--dead-letters", int),), dlq)},
    )
