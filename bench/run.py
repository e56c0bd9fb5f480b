"""Peer benchmark of nobs_amqp against raw aio-pika, dramatiq, celery, faststream and taskiq, with
RabbitMQ's Java client as the anchor (what the broker does when the client costs next to nothing).

    python bench/run.py --phases all --n 20000 --rounds 3   # make bench
    python bench/run.py --quick      # every phase once at small sizes: a few minutes (make bench-quick)
    python bench/run.py --smoke      # tiny run of the systems whose env exists (well under a minute)

Stdlib only: run it with any Python >= 3.11; each system runs in its own env (bench/envs.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
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
PLOTS = envs.BENCH / "plots"
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
GROWTH_SYSTEMS = ("nobs_amqp", "aiopika")
SMOKE_PHASES = ("enqueue_sequential", "enqueue_batched", "drain_default")
QUICK_N = 1000
#: (system, phase) pairs a system cannot run with its own mechanisms, and why.
UNSUPPORTED = {
    ("faststream", "retry_path"): "no delayed retry built in (NackMessage requeues at once; no delay mechanism)",
}
#: The systems a phase runs for (others skip it, silently); `--growth-systems` for memory_depth and
#: payload_size. The Java anchor runs the enqueue and drain phases only.
PHASE_SYSTEMS = {
    "retry_path": envs.SYSTEMS,
    "latency": envs.SYSTEMS,
    "delay_accuracy": ("nobs_amqp",),
    "project_scale": ("nobs_amqp",),
    "dlq_scale": ("nobs_amqp",),
}


def _numbers(kind: type) -> Any:
    def parse(text: str) -> tuple[Any, ...]:
        return tuple(kind(part) for part in text.split(",") if part)

    return parse


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    every = (*envs.SYSTEMS, *envs.ANCHORS)
    parser.add_argument("--systems", default=",".join(every), help="comma-separated (default: all)")
    parser.add_argument("--n", type=int, default=20000, help="messages per phase (default 20000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--phases", default=None, help=f"comma-separated from {ph.PHASES}, or all (default: {ph.DEFAULT_PHASES})"
    )
    parser.add_argument(
        "--growth-systems",
        "--memory-systems",
        default=",".join(GROWTH_SYSTEMS),
        help="systems memory_depth and payload_size run for",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--smoke", action="store_true", help=f"--n 200 --rounds 1, phases {SMOKE_PHASES}")
    parser.add_argument("--quick", action="store_true", help=f"every phase once, small: --n {QUICK_N} --rounds 1")
    parser.add_argument("--url", default=os.environ.get("NOBS_AMQP_URL") or DEFAULT_URL, help="broker (loopback)")
    parser.add_argument("--management-url", default=None, help="default: http://<broker host>:15672")
    parser.add_argument("--keep-logs", action="store_true", help="keep the workers' logs")
    parser.add_argument("--no-plot", action="store_true", help="draw no plots (default: bench/plots/*.png)")
    sizes = parser.add_argument_group("sizes of the latency, delay and growth phases (defaults: make bench)")
    full, quick = ph.Sizes(), ph.QUICK
    for field in dataclasses.fields(ph.Sizes):
        default = getattr(full, field.name)
        kind = type(default[0]) if isinstance(default, tuple) else type(default)
        shown = ",".join(f"{v:g}" for v in default) if isinstance(default, tuple) else f"{default:g}"
        sizes.add_argument(
            "--" + field.name.replace("_", "-"),
            type=_numbers(kind) if isinstance(default, tuple) else kind,
            default=None,
            help=f"default {shown}; --quick {_shown(getattr(quick, field.name))}",
        )
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.rounds, args.phases = 200, 1, ",".join(SMOKE_PHASES)
    if args.quick:
        args.n, args.rounds, args.phases = QUICK_N, 1, args.phases or "all"
    args.phases = args.phases or ",".join(ph.DEFAULT_PHASES)
    if args.phases == "all":
        args.phases = ",".join(ph.PHASES)
    base = quick if args.quick else full
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(ph.Sizes) if getattr(args, f.name) is not None}
    args.sizes = dataclasses.replace(base, **given)
    for phase in args.phases.split(","):
        if phase not in ph.PHASES:
            parser.error(f"unknown phase {phase!r} (known: {', '.join(ph.PHASES)})")
    if not 1 <= args.n <= 1_000_000 or not 1 <= args.rounds <= 20:
        parser.error("--n must be 1..1000000 and --rounds 1..20")
    if any(not 1 <= d <= 1_000_000 for d in args.sizes.depths):
        parser.error("--depths must be 1..1000000 each")
    return args


def _shown(value: Any) -> str:
    return ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else f"{value:g}"


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


def runs(phase: str, system: str, growth_systems: set[str]) -> bool:
    """Whether `phase` is measured for `system` at all."""
    if phase in ("memory_depth", "payload_size"):
        return system in growth_systems
    if system in envs.ANCHORS:
        return phase in (*ph.ENQUEUE_PHASES, *ph.DRAIN_PHASES)
    return system in PHASE_SYSTEMS.get(phase, (system,))


def run_rounds(args: argparse.Namespace, ready: dict[str, envs.Env], base: ph.Context) -> list[dict[str, Any]]:
    measurements: list[dict[str, Any]] = []
    order = list(ready)
    growth_systems = set(args.growth_systems.split(","))
    for round_ in range(1, args.rounds + 1):
        rotation = order[(round_ - 1) % len(order) :] + order[: (round_ - 1) % len(order)]
        for phase in args.phases.split(","):
            if phase in ph.ONCE_PHASES and round_ > 1:
                continue  # measured once per run: in its first round
            for system in rotation:
                if not runs(phase, system, growth_systems):
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
    shown = entry.pop("shown", None) if entry["ok"] else entry["error"]
    shown = shown or f"{entry['rate']:,.0f} msg/s"
    log(f"[round {ctx.round}] {phase:<19} {ctx.system:<12} {shown}")
    return entry


def plot(results: Path) -> None:
    """Draw bench/plots/*.png from `results` with matplotlib, in the `plot` env (not the project's)."""
    try:
        env = envs.ensure("plot")
    except envs.EnvError as exc:
        print(f"plots: unavailable: {exc}")
        return
    command = [str(env.python), str(envs.BENCH / "plot.py"), str(results), str(PLOTS)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        print(f"plots: failed: {' | '.join(done.stderr.strip().splitlines()[-3:])}")
        return
    print(done.stdout.strip())


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
    base.confirm_with_management = not (args.smoke or args.quick)
    base.sizes = args.sizes
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
    rows = report.summarize(measurements, [p for p in args.phases.split(",") if p in ph.RATE_PHASES], systems)
    result = {
        "started": started.isoformat(),
        "seconds": (datetime.now(UTC) - started).total_seconds(),
        "arguments": {
            "systems": systems,
            "n": args.n,
            "rounds": args.rounds,
            "phases": args.phases.split(","),
            "quick": args.quick,
            "sizes": dataclasses.asdict(args.sizes),
        },
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
    print(report.tables(result))
    for system, reason in unavailable.items():
        print(f"{system}: unavailable: {reason}")
    if not (args.no_plot or args.smoke):
        plot(paths[0])
    print(f"\n{result['machine']}; {result['seconds']:.0f} s; results in {', '.join(str(p) for p in paths)}")
    failed = [m for m in measurements if not m["ok"] and not m["error"].startswith("unsupported")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
