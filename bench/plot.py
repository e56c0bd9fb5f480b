"""Plots of one run's results: `plot.py RESULTS.json OUT_DIR` writes latency.png and growth.png.

Runs in the bench's own `plot` env (matplotlib; bench/envs.py makes it), never the project's:
run.py calls it at the end of a run (unless --no-plot).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes

ANCHOR_PHASES = ("enqueue_sequential", "enqueue_concurrent", "enqueue_batched", "drain_default", "drain_tuned")


def ok(result: dict[str, Any], phase: str) -> list[dict[str, Any]]:
    return [m for m in result["measurements"] if m["phase"] == phase and m["ok"]]


def by_system(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for m in runs:
        found.setdefault(m["system"], []).append(m)
    return found


def median(values: list[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return statistics.median(found) if found else None


def series(runs: list[dict[str, Any]], cases: str, get: Any) -> tuple[list[float], list[float]]:
    """x (the cases, as numbers) and the median of `get` over the runs, for each case."""
    keys = sorted({k for m in runs for k in m[cases]}, key=float)
    xs, ys = [], []
    for k in keys:
        y = median([get(m[cases][k]) for m in runs if k in m[cases]])
        if y is not None:
            xs.append(float(k))
            ys.append(y)
    return xs, ys


def empty(ax: Axes, title: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def lines(ax: Axes, runs: list[dict[str, Any]], cases: str, get: Any, title: str, xlabel: str, ylabel: str) -> None:
    if not runs:
        empty(ax, title)
        return
    for system, mine in by_system(runs).items():
        xs, ys = series(mine, cases, get)
        ax.plot(xs, ys, marker="o", label=system)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    log_x(ax, sorted({float(k) for m in runs for k in m[cases]}))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def log_y(ax: Axes) -> None:
    """A log y axis with plain numbers (1, 2, 5, 10, ...), not powers of ten."""
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.10g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(
        matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.10g}" if str(v)[0] in "25" else "")
    )


def log_x(ax: Axes, ticks: list[float]) -> None:
    """A log x axis labelled at the measured cases only, in plain numbers."""
    ax.set_xscale("log")
    ax.set_xticks(ticks, [f"{t:,.0f}" for t in ticks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def latency(result: dict[str, Any], out: Path, subtitle: str) -> Path:
    runs = ok(result, "latency")
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    panels = [
        (axes[0][0], lambda v: v["enqueue_to_start"]["p50"] * 1000, "enqueue → task start, p50", "ms"),
        (axes[0][1], lambda v: v["enqueue_to_start"]["p99"] * 1000, "enqueue → task start, p99", "ms"),
        (axes[1][0], lambda v: v["queue_call"]["p99"] * 1000, "the enqueue call's own duration, p99", "ms"),
        (axes[1][1], lambda v: v["throughput"], "tasks done per second", "tasks/s"),
    ]
    for ax, get, title, unit in panels:
        lines(ax, runs, "rates", get, title, "offered load, tasks/s", unit)
        if runs and unit == "ms":
            log_y(ax)
    if runs:
        rates = sorted({float(r) for m in runs for r in m["rates"]})
        axes[1][1].plot(rates, rates, linestyle=":", color="grey", label="offered")
        log_y(axes[1][1])
        axes[1][1].legend(fontsize=7)
    fig.suptitle(f"Latency and throughput against load ({subtitle})")
    fig.tight_layout()
    path = out / "latency.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def anchor(ax: Axes, result: dict[str, Any]) -> None:
    title = "nobs_amqp as a fraction of the Java client"
    rates: dict[tuple[str, str], list[float]] = {}
    for m in result["measurements"]:
        if m["ok"] and m["phase"] in ANCHOR_PHASES and "rate" in m:
            rates.setdefault((m["phase"], m["system"]), []).append(m["rate"])
    phases = [p for p in ANCHOR_PHASES if (p, "java_quorum") in rates and (p, "nobs_amqp") in rates]
    if not phases:
        empty(ax, title)
        return
    width = 0.38
    for i, (anchor_system, label) in enumerate(
        (("java_quorum", "÷ Java, quorum"), ("java_classic", "÷ Java, classic"))
    ):
        values = [
            (median(rates[(p, "nobs_amqp")]) or 0) / (median(rates.get((p, anchor_system), [])) or float("nan"))
            for p in phases
        ]
        ax.bar([x + (i - 0.5) * width for x in range(len(phases))], values, width, label=label)
    ax.axhline(1.0, color="grey", linestyle=":")
    ax.set_xticks(range(len(phases)), [p.replace("enqueue_", "enq. ").replace("drain_", "drain ") for p in phases])
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(title)
    ax.set_ylabel("fraction of the Java client's msg/s")
    ax.legend(fontsize=7)


def growth(result: dict[str, Any], out: Path, subtitle: str) -> Path:
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    depth = ok(result, "memory_depth")
    lines(axes[0][0], depth, "depths", lambda v: v["rate"], "drain rate by queue depth", "messages queued", "msg/s")
    lines(axes[1][0], depth, "depths", lambda v: v["peak_rss_mib"], "worker RSS by queue depth", "messages", "MiB")
    payload = ok(result, "payload_size")
    lines(
        axes[0][1], payload, "sizes", lambda v: v["drain_mb_s"], "drain throughput by payload", "payload, bytes", "MB/s"
    )
    if payload:
        log_y(axes[0][1])
    scale = ok(result, "project_scale")
    ax = axes[1][1]
    if scale:
        for key, label in (
            ("first_publish_all_seconds", "first publish to every worker"),
            ("cli_first_task_seconds", "`consume` of one worker: first task"),
            ("consume_all_ready_seconds", "in-process: every worker consuming"),
        ):
            xs, ys = series(scale, "workers", lambda v, key=key: v[key])
            ax.plot(xs, ys, marker="o", label=label)
        log_x(ax, xs)
        ax.set_title("start-up by project size")
        ax.set_xlabel("workers in the project")
        ax.set_ylabel("s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    else:
        empty(ax, "start-up by project size")
    dlq = ok(result, "dlq_scale")
    ax = axes[0][2]
    if dlq:
        for key in ("list", "show", "replay"):
            xs, ys = series(dlq, "dead_letters", lambda v, key=key: v[key]["seconds"])
            ax.plot(xs, ys, marker="o", label=f"nobs-amqp dlq {key}")
        log_x(ax, xs)
        log_y(ax)
        ax.set_title("dlq commands by DLQ size")
        ax.set_xlabel("dead letters")
        ax.set_ylabel("s (whole command)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    else:
        empty(ax, "dlq commands by DLQ size")
    anchor(axes[1][2], result)
    fig.suptitle(f"How cost grows ({subtitle})")
    fig.tight_layout()
    path = out / "growth.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: plot.py RESULTS.json OUT_DIR", file=sys.stderr)
        return 2
    result = json.loads(Path(argv[0]).read_text())
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    arguments = result["arguments"]
    kind = "quick run" if arguments.get("quick") else f"{arguments['rounds']} round(s), n={arguments['n']}"
    subtitle = f"{result['started'][:10]}, {kind}, {result['machine'].get('nproc')} cores"
    repo = Path(__file__).resolve().parent.parent
    for path in (latency(result, out, subtitle), growth(result, out, subtitle)):
        shown = path.resolve().relative_to(repo) if path.resolve().is_relative_to(repo) else path
        print(f"plot: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
