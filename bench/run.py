"""Peer benchmark of nobs_amqp against raw aio-pika, dramatiq, celery, faststream and taskiq.

    python bench/run.py --systems nobs_amqp,aiopika,dramatiq,celery,faststream,taskiq --n 20000 --rounds 3
    python bench/run.py --smoke      # tiny run of the systems whose env exists (well under a minute)

Stdlib only: run it with any Python >= 3.11; each system runs in its own env (bench/envs.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import envs
import phases as ph
import report
from mgmt import Management, ManagementError, amqp_answers, with_vhost

RESULTS = envs.BENCH / "results"
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
MEMORY_SYSTEMS = ("nobs_amqp", "aiopika")
SMOKE_PHASES = ("enqueue_sequential", "enqueue_batched", "drain_default")
#: (system, phase) pairs a system cannot run with its own mechanisms, and why.
UNSUPPORTED = {
    ("faststream", "retry_path"): "no delayed retry built in (NackMessage requeues at once; no delay mechanism)",
}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default=",".join(envs.SYSTEMS), help="comma-separated (default: all)")
    parser.add_argument("--n", type=int, default=20000, help="messages per phase (default 20000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--phases", default=",".join(ph.DEFAULT_PHASES), help=f"comma-separated from {ph.PHASES}")
    parser.add_argument("--memory-systems", default=",".join(MEMORY_SYSTEMS), help="systems memory_depth runs for")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--smoke", action="store_true", help=f"--n 200 --rounds 1, phases {SMOKE_PHASES}")
    parser.add_argument("--url", default=os.environ.get("NOBS_AMQP_URL") or DEFAULT_URL, help="broker (loopback)")
    parser.add_argument("--management-url", default=None, help="default: http://<broker host>:15672")
    parser.add_argument("--keep-logs", action="store_true", help="keep the workers' logs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.rounds, args.phases = 200, 1, ",".join(SMOKE_PHASES)
    for phase in args.phases.split(","):
        if phase not in ph.PHASES:
            parser.error(f"unknown phase {phase!r} (known: {', '.join(ph.PHASES)})")
    if not 1 <= args.n <= 1_000_000 or not 1 <= args.rounds <= 20:
        parser.error("--n must be 1..1000000 and --rounds 1..20")
    return args


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def prepare(systems: list[str], smoke: bool) -> tuple[dict[str, envs.Env], dict[str, str]]:
    """The env of each system that has one; the reason for each that has none."""
    ready: dict[str, envs.Env] = {}
    unavailable: dict[str, str] = {}
    for system in systems:
        try:
            env = envs.env_for(system)
            if smoke and not env.exists():
                unavailable[system] = "its env is not created (--smoke only uses existing envs)"
                continue
            ready[system] = envs.ensure(system)
        except envs.EnvError as exc:
            unavailable[system] = str(exc)
    return ready, unavailable


def machine(management: Management) -> dict[str, Any]:
    try:
        overview = management.overview()
    except ManagementError as exc:
        overview = {"error": str(exc)}
    return {
        "nproc": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "rabbitmq": overview.get("rabbitmq_version"),
        "erlang": overview.get("erlang_version"),
    }


def run_rounds(args: argparse.Namespace, ready: dict[str, envs.Env], base: ph.Context) -> list[dict[str, Any]]:
    measurements: list[dict[str, Any]] = []
    order = list(ready)
    memory_systems = set(args.memory_systems.split(","))
    for round_ in range(1, args.rounds + 1):
        rotation = order[(round_ - 1) % len(order) :] + order[: (round_ - 1) % len(order)]
        for phase in args.phases.split(","):
            for system in rotation:
                if phase == "memory_depth" and system not in memory_systems:
                    continue
                ctx = ph.Context(**{**base.__dict__, "system": system, "env": ready[system], "round": round_})
                measurements.append(measure(ctx, phase))
    return measurements


def measure(ctx: ph.Context, phase: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"round": ctx.round, "phase": phase, "system": ctx.system, "n": ctx.n}
    reason = UNSUPPORTED.get((ctx.system, phase))
    started = time.perf_counter()
    if reason:
        entry.update(ok=False, error=f"unsupported: {reason}")
    elif not amqp_answers(ctx.url):
        entry.update(ok=False, error="the broker accepts TCP but starts no AMQP connection (within 5 s)")
    else:
        try:
            entry.update(ok=True, **ph.run_phase(ctx, phase))
        except (ph.PhaseError, ManagementError, OSError) as exc:
            entry.update(ok=False, error=private(str(exc), ctx.workdir))
    entry["wall_seconds"] = time.perf_counter() - started
    shown = f"{entry['rate']:,.0f} msg/s" if entry["ok"] else entry["error"]
    log(f"[round {ctx.round}] {phase:<19} {ctx.system:<11} {shown}")
    return entry


def private(text: str, workdir: Path) -> str:
    """`text` without this machine's paths (results files must not carry them)."""
    return text.replace(str(workdir), "<workdir>").replace(str(envs.REPO), "<repo>")


def main(argv: list[str]) -> int:
    args = parse(argv)
    systems = [s for s in args.systems.split(",") if s]
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    management = Management(args.url, args.management_url)
    if not amqp_answers(args.url):
        print(f"the broker at {args.url.rpartition('@')[2]} starts no AMQP connection (within 5 s): not running")
        return 3
    log(f"bench: systems {', '.join(systems)}; n={args.n}; rounds={args.rounds}; phases {args.phases}")
    ready, unavailable = prepare(systems, args.smoke)
    for system, reason in unavailable.items():
        log(f"bench: {system} unavailable: {reason}")
    if not ready:
        print("no system can run (for --smoke, create envs first: `python bench/envs.py nobs_amqp aiopika`)")
        return 2
    vhost = f"bench-{stamp}-{uuid.uuid4().hex[:6]}"
    workdir = Path(tempfile.mkdtemp(prefix="nobs-bench-"))
    management.create_vhost(vhost)
    base = ph.Context("", envs.env_for(systems[0]), with_vhost(args.url, vhost), vhost, management, args.n, workdir, 0)
    base.confirm_with_management = not args.smoke
    try:
        measurements = run_rounds(args, ready, base)
    finally:
        try:
            management.delete_vhost(vhost)
        except ManagementError as exc:
            log(f"bench: could not delete vhost {vhost}: {exc}")
        if args.keep_logs:
            log(f"bench: worker logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    rows = report.summarize(measurements, args.phases.split(","), systems)
    result = {
        "started": started.isoformat(),
        "seconds": (datetime.now(UTC) - started).total_seconds(),
        "arguments": {"systems": systems, "n": args.n, "rounds": args.rounds, "phases": args.phases.split(",")},
        "machine": machine(management),
        "unavailable": unavailable,
        "versions": {system: envs.versions(env) for system, env in ready.items()},
        "summary": rows,
        "measurements": measurements,
    }
    RESULTS.mkdir(exist_ok=True)
    paths = [RESULTS / f"{stamp}.json", *([args.json] if args.json else [])]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    print(report.table(rows))
    for system, reason in unavailable.items():
        print(f"{system}: unavailable: {reason}")
    print(f"\n{result['machine']}; {result['seconds']:.0f} s; results in {', '.join(str(p) for p in paths)}")
    failed = [m for m in measurements if not m["ok"] and not m["error"].startswith("unsupported")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
