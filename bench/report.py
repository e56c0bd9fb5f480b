"""Summaries of a run: medians, spreads and ratios to raw aio-pika in the same round; the Java
anchor's fractions; the latency, delay and growth tables (each ratio to the smallest case)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from typing import Any

BASELINE = "aiopika"
SUBJECT = "nobs_amqp"
JAVA_QUORUM, JAVA_CLASSIC = "java_quorum", "java_classic"
ANCHOR_PHASES = ("enqueue_sequential", "enqueue_concurrent", "enqueue_batched", "drain_default", "drain_tuned")


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(measurements: list[dict[str, Any]], phases: list[str], systems: list[str]) -> list[dict[str, Any]]:
    """One row per (phase, system) that was measured or tried."""
    baseline = {
        (m["phase"], m["round"]): m["rate"]
        for m in measurements
        if m["system"] == BASELINE and m["ok"] and m["phase"] in phases
    }
    rows = []
    for phase in phases:
        for system in systems:
            tried = [m for m in measurements if m["phase"] == phase and m["system"] == system]
            if not tried:
                continue
            ok = [m for m in tried if m["ok"]]
            rates = [m["rate"] for m in ok]
            ratios = [m["rate"] / baseline[(phase, m["round"])] for m in ok if (phase, m["round"]) in baseline]
            errors = sorted({m["error"] for m in tried if not m["ok"]})
            rows.append(
                {
                    "phase": phase,
                    "system": system,
                    "rounds_ok": len(ok),
                    "rounds": len(tried),
                    "rate_median": _median(rates),
                    "rate_min": min(rates) if rates else None,
                    "rate_max": max(rates) if rates else None,
                    "ratio_to_aiopika": _median(ratios),
                    "cpu_per_1000": _median([m["cpu_per_1000"] for m in ok if m.get("cpu_per_1000") is not None]),
                    "peak_rss_mib": _median([m["peak_rss_mib"] for m in ok if m.get("peak_rss_mib") is not None]),
                    "time_to_first": _median([m["time_to_first"] for m in ok if m.get("time_to_first") is not None]),
                    "rss_growth_mib": _median([m["rss_growth_mib"] for m in ok if "rss_growth_mib" in m]),
                    "errors": errors,
                }
            )
    return rows


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table (it reads fine in a terminal too)."""
    head = "| phase | system | msg/s (median) | min–max | × aio-pika | CPU s/1000 msgs | peak RSS MiB | first task s |"
    lines = [head, "|---|---|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        if not r["rounds_ok"]:
            lines.append(f"| {r['phase']} | {r['system']} | unavailable: {'; '.join(r['errors'])[:200]} ||||||")
            continue
        spread = f"{_num(r['rate_min'], ',.0f')}–{_num(r['rate_max'], ',.0f')}"
        rss = _num(r["peak_rss_mib"], ".0f")
        if r["rss_growth_mib"] is not None:
            rss += f" ({r['rss_growth_mib']:+.0f} deepest)"
        partial = "" if r["rounds_ok"] == r["rounds"] else f" ({r['rounds_ok']}/{r['rounds']} rounds ok)"
        lines.append(
            f"| {r['phase']} | {r['system']}{partial} | {_num(r['rate_median'], ',.0f')} | {spread} "
            f"| {_num(r['ratio_to_aiopika'], '.2f')} | {_num(r['cpu_per_1000'], '.2f')} | {rss} "
            f"| {_num(r['time_to_first'], '.2f')} |"
        )
    return "\n".join(lines)


# -- the other tables ------------------------------------------------------------------------------


def _ok(measurements: list[dict[str, Any]], phase: str, system: str | None = None) -> list[dict[str, Any]]:
    return [m for m in measurements if m["phase"] == phase and m["ok"] and system in (None, m["system"])]


def _failed(measurements: list[dict[str, Any]], phases: Iterable[str]) -> list[str]:
    return [
        f"{m['phase']} {m['system']} (round {m['round']}): {m['error'][:300]}"
        for m in measurements
        if m["phase"] in phases and not m["ok"]
    ]


def _md(head: list[str], rows: list[list[str]], left: int = 2) -> str:
    """A Markdown table: the first `left` columns left-aligned, the numbers right-aligned."""
    align = ["---"] * left + ["--:"] * (len(head) - left)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _x(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def _per_round(
    measurements: list[dict[str, Any]], phase: str, system: str, value: Callable[[dict[str, Any]], float | None]
) -> dict[int, float]:
    found = {}
    for m in _ok(measurements, phase, system):
        v = value(m)
        if v is not None:
            found[m["round"]] = v
    return found


def _median_ratio(top: dict[int, float], bottom: dict[int, float]) -> float | None:
    return _median([top[r] / bottom[r] for r in top if bottom.get(r)])


def anchor_table(measurements: list[dict[str, Any]]) -> str | None:
    """nobs_amqp's rates as fractions of the Java client's (quorum and classic queue), per round."""
    rows = []
    for phase in ANCHOR_PHASES:

        def rate(m: dict[str, Any]) -> float | None:
            return m.get("rate")

        def steady(m: dict[str, Any]) -> float | None:
            return m.get("steady_rate")

        nobs, aio = _per_round(measurements, phase, SUBJECT, rate), _per_round(measurements, phase, BASELINE, rate)
        quorum = _per_round(measurements, phase, JAVA_QUORUM, rate)
        classic = _per_round(measurements, phase, JAVA_CLASSIC, rate)
        if not (quorum or classic):
            continue
        drain = phase.startswith("drain")
        steady_fraction = (
            _median_ratio(
                _per_round(measurements, phase, SUBJECT, steady), _per_round(measurements, phase, JAVA_QUORUM, steady)
            )
            if drain
            else None
        )
        rows.append(
            [
                phase,
                _num(_median(list(nobs.values())), ",.0f"),
                _num(_median(list(quorum.values())), ",.0f"),
                _num(_median(list(classic.values())), ",.0f"),
                _num(_median_ratio(nobs, quorum), ".2f"),
                _num(_median_ratio(nobs, classic), ".2f"),
                _num(_median_ratio(aio, classic), ".2f"),
                _num(steady_fraction, ".2f"),
            ]
        )
    if not rows:
        return None
    head = ["phase", "nobs_amqp msg/s", "Java quorum", "Java classic", "nobs ÷ Java quorum", "nobs ÷ Java classic"]
    head += ["aio-pika ÷ Java classic", "drain first→last task: nobs ÷ Java quorum"]
    return _md(head, rows, left=1)


def _stat(values: list[dict[str, Any]], key: str, scale: float = 1.0) -> float | None:
    found = [v[key] * scale for v in values if v and v.get(key) is not None]
    return _median(found)


def latency_table(measurements: list[dict[str, Any]], systems: list[str]) -> str | None:
    ok = _ok(measurements, "latency")
    if not ok:
        return None
    rates = sorted({float(r) for m in ok for r in m["rates"]})
    rows = []
    for rate in rates:
        key = f"{rate:g}"
        for system in systems:
            runs = [m for m in ok if m["system"] == system and key in m["rates"]]
            if not runs:
                continue
            at = [m["rates"][key] for m in runs]
            start = [a["enqueue_to_start"] for a in at]
            call = [a["queue_call"] for a in at]
            ratios = {}
            for q in ("p50", "p99"):

                def pick(m: dict[str, Any], q: str = q, key: str = key) -> float | None:
                    r = m["rates"].get(key)
                    return r["enqueue_to_start"][q] if r else None

                ratios[q] = _median_ratio(
                    _per_round(measurements, "latency", system, pick),
                    _per_round(measurements, "latency", BASELINE, pick),
                )
            rows.append(
                [
                    f"{rate:,.0f}",
                    system,
                    *(_num(_stat(start, q, 1000), ".1f") for q in ("p50", "p99", "max")),
                    *(_num(_stat(call, q, 1000), ".1f") for q in ("p50", "p99", "max")),
                    _done(_median([a["throughput"] for a in at]), rate),
                    _num(ratios["p50"], ".2f"),
                    _num(ratios["p99"], ".2f"),
                ]
            )
    head = ["offered/s", "system", "enqueue→start p50 ms", "p99 ms", "max ms", "enqueue call p50 ms", "p99 ms"]
    head += ["max ms", "tasks/s done", "p50 × aio-pika", "p99 × aio-pika"]
    return _md(head, rows)


SATURATED = 0.9  # tasks done per second below this share of the offered rate: the worker fell behind


def _done(throughput: float | None, offered: float) -> str:
    shown = _num(throughput, ",.0f")
    return shown + " (behind)" if throughput is not None and throughput < SATURATED * offered else shown


def delay_table(measurements: list[dict[str, Any]]) -> str | None:
    ok = _ok(measurements, "delay_accuracy")
    if not ok:
        return None
    rows = []
    for m in ok:
        for mode, v in m["modes"].items():
            load = v.get("load_latency") or {}
            rows.append(
                [
                    f"{m['system']} {mode}",
                    f"{v['delayed']:,}",
                    *(_num(v["late"][q], ".3f") for q in ("p50", "p90", "p99", "max")),
                    str(v["early"]),
                    _num(v["load_rate"] or None, ",.0f"),
                    _num(_stat([load], "p50", 1000), ".1f"),
                    _num(_stat([load], "p99", 1000), ".1f"),
                ]
            )
    head = ["system, mode", "delayed tasks", "late p50 s", "p90 s", "p99 s", "max s", "early", "load tasks/s"]
    head += ["load p50 ms", "load p99 ms"]
    return _md(head, rows, left=1)


def _growth(
    measurements: list[dict[str, Any]],
    phase: str,
    cases: str,
    columns: list[tuple[str, Callable[[dict[str, Any]], float | None], str, bool]],
    label: Callable[[str], str] = lambda c: f"{int(c):,}",
) -> list[list[str]]:
    """One row per (system, case); for each column its median value and, if asked, × the smallest case."""
    rows = []
    for system in dict.fromkeys(m["system"] for m in _ok(measurements, phase)):
        runs = _ok(measurements, phase, system)
        keys = sorted({k for m in runs for k in m[cases]}, key=float)
        values = {k: [m[cases][k] for m in runs if k in m[cases]] for k in keys}
        for k in keys:
            row = [system, label(k)]
            for _, get, fmt, ratio in columns:
                here = _median([v for v in map(get, values[k]) if v is not None])
                small = _median([v for v in map(get, values[keys[0]]) if v is not None])
                row.append(_num(here, fmt))
                if ratio:
                    row.append(_num(_x(here, small), ".2f"))
            rows.append(row)
    return rows


def _head(first: list[str], columns: list[tuple[str, Any, str, bool]], smallest: str) -> list[str]:
    head = list(first)
    for name, _, _, ratio in columns:
        head.append(name)
        if ratio:
            head.append(f"× {smallest}")
    return head


def depth_table(measurements: list[dict[str, Any]]) -> str | None:
    if not _ok(measurements, "memory_depth"):
        return None
    columns = [
        ("drain msg/s", lambda v: v["rate"], ",.0f", True),
        ("first→last task msg/s", lambda v: v.get("steady_rate"), ",.0f", True),
        ("worker peak RSS MiB", lambda v: v["peak_rss_mib"], ".1f", True),
        ("CPU s/1000", lambda v: v["cpu_per_1000"], ".2f", False),
    ]
    rows = _growth(measurements, "memory_depth", "depths", columns)
    return _md(_head(["system", "queue depth"], columns, "smallest"), rows)


def payload_table(measurements: list[dict[str, Any]]) -> str | None:
    if not _ok(measurements, "payload_size"):
        return None
    columns = [
        ("messages", lambda v: v["n"], ",.0f", False),
        ("enqueue msg/s", lambda v: v["enqueue_rate"], ",.0f", True),
        ("enqueue MB/s", lambda v: v["enqueue_mb_s"], ",.1f", False),
        ("drain msg/s", lambda v: v["drain_rate"], ",.0f", True),
        ("drain MB/s", lambda v: v["drain_mb_s"], ",.1f", False),
        ("worker RSS MiB", lambda v: v["worker_rss_mib"], ".1f", True),
        ("producer RSS MiB", lambda v: v["producer_rss_mib"], ".1f", True),
    ]
    rows = _growth(measurements, "payload_size", "sizes", columns, lambda c: f"{int(c):,} B")
    return _md(_head(["system", "payload"], columns, "smallest"), rows)


def scale_table(measurements: list[dict[str, Any]]) -> str | None:
    if not _ok(measurements, "project_scale"):
        return None
    columns = [
        ("open s", lambda v: v["open_seconds"], ".3f", False),
        ("first publish p50 ms", lambda v: v["first_publish"]["p50"] * 1000, ".1f", True),
        ("first publish to every worker s", lambda v: v["first_publish_all_seconds"], ".2f", True),
        ("warm publish p50 ms", lambda v: v["warm_publish"]["p50"] * 1000, ".1f", False),
        ("`consume` first task s", lambda v: v["cli_first_task_seconds"], ".2f", True),
        ("`consume` RSS MiB", lambda v: v["cli_peak_rss_mib"], ".1f", True),
        ("in-process, all consuming s", lambda v: v["consume_all_ready_seconds"], ".2f", True),
    ]
    rows = _growth(measurements, "project_scale", "workers", columns)
    return _md(_head(["system", "workers"], columns, "1 worker"), rows)


def dlq_table(measurements: list[dict[str, Any]]) -> str | None:
    if not _ok(measurements, "dlq_scale"):
        return None
    columns = [
        ("fill s", lambda v: v["fill_seconds"], ".2f", False),
        ("CLI start s", lambda v: v["cli_start"]["seconds"], ".2f", False),
        ("`dlq list` s", lambda v: v["list"]["seconds"], ".2f", True),
        ("`dlq show` (last) s", lambda v: v["show"]["seconds"], ".2f", True),
        ("`dlq replay` s", lambda v: v["replay"]["seconds"], ".2f", True),
        ("replay msg/s", lambda v: v["replayed"] / v["replay"]["seconds"], ",.0f", False),
        ("peak RSS MiB (replay)", lambda v: v["replay"]["peak_rss_mib"], ".1f", True),
    ]
    rows = _growth(measurements, "dlq_scale", "dead_letters", columns)
    return _md(_head(["system", "dead letters"], columns, "smallest"), rows)


def tables(result: dict[str, Any]) -> str:
    """Every table of a run, each under a heading, and what failed in the phases without a row."""
    measurements = result["measurements"]
    systems = result["arguments"]["systems"]
    parts = [
        ("Throughput (× aio-pika: median of per-round ratios)", table(result["summary"]) if result["summary"] else None)
    ]
    anchor = anchor_table(measurements)
    if anchor is None and any(s in result["unavailable"] for s in (JAVA_QUORUM, JAVA_CLASSIC)):
        reason = result["unavailable"].get(JAVA_QUORUM) or result["unavailable"].get(JAVA_CLASSIC)
        anchor = f"unavailable: {reason}"
    parts += [
        ("Against the limit: nobs_amqp as a fraction of the Java client (median of per-round ratios)", anchor),
        (
            "Latency at a steady rate (median over rounds; × aio-pika: median of per-round ratios)",
            latency_table(measurements, systems),
        ),
        ("Delay ladder: how late delayed tasks started", delay_table(measurements)),
        ("Queue depth", depth_table(measurements)),
        ("Payload size", payload_table(measurements)),
        ("Project size (workers)", scale_table(measurements)),
        ("DLQ size: the nobs-amqp dlq commands, each its own process", dlq_table(measurements)),
    ]
    out = [f"\n### {title}\n\n{body}" for title, body in parts if body is not None]
    failed = _failed(measurements, ("latency", "delay_accuracy", "payload_size", "project_scale", "dlq_scale"))
    if failed:
        out.append("\nfailed:\n" + "\n".join(f"- {f}" for f in failed))
    return "\n".join(out).lstrip("\n")
