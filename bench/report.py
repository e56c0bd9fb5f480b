"""Summaries of a run: medians, spreads and ratios to raw aio-pika in the same round."""

from __future__ import annotations

import statistics
from typing import Any

BASELINE = "aiopika"


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(measurements: list[dict[str, Any]], phases: list[str], systems: list[str]) -> list[dict[str, Any]]:
    """One row per (phase, system) that was measured or tried."""
    baseline = {(m["phase"], m["round"]): m["rate"] for m in measurements if m["system"] == BASELINE and m["ok"]}
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
            rss += f" (+{r['rss_growth_mib']:.0f} at 100k deep)"
        partial = "" if r["rounds_ok"] == r["rounds"] else f" ({r['rounds_ok']}/{r['rounds']} rounds ok)"
        lines.append(
            f"| {r['phase']} | {r['system']}{partial} | {_num(r['rate_median'], ',.0f')} | {spread} "
            f"| {_num(r['ratio_to_aiopika'], '.2f')} | {_num(r['cpu_per_1000'], '.2f')} | {rss} "
            f"| {_num(r['time_to_first'], '.2f')} |"
        )
    return "\n".join(lines)
