"""Owns the README block of the intra-layer benchmark, rendered from results/intralayer.json.

:func:`render` is :mod:`report`'s renderer for the ``intralayer`` block: when and on what,
how the rounds were measured, per (fleet, model, strategy) the plan's blocks, p50/p95,
the predicted latency, where the time went and the most any agent sent per request, each
as median (min-max) over the rounds; then the combined DP's ratios and the issue's
targets, with by how much a missed one was missed. A pure function of the JSON.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from edgeslice.benchmarks.report import DASH, machine_line, mmm

RULES = {">": "above", ">=": "at least", "<": "below", "<=": "at most"}


def plan_shape(layouts: list[str]) -> str:
    """``5 blocks: grid x4, whole x1`` from a layout string (blocks ``strategy a-b``)."""
    if not layouts:
        return "-"
    shapes = []
    for layout in layouts:
        kinds = Counter(part.split(" ")[0] for part in layout.split(", "))
        n = sum(kinds.values())
        detail = ", ".join(f"{k} \u00d7{v}" for k, v in kinds.items())
        shapes.append(f"{n} block{'s' if n != 1 else ''}: {detail}")
    return "; ".join(shapes)


def _most_sent(row: dict[str, Any]) -> str:
    """The largest per-agent median of bytes sent per request, in kB."""
    figures = [f for f in row.get("sent_bytes_per_request", {}).values() if f.get("n")]
    if not figures:
        return "-"
    top = max(figures, key=lambda f: f["median"])
    return mmm(top, 1e-3, 0)


def _target(t: dict[str, Any]) -> str:
    figure = {k: t.get(k) for k in ("median", "min", "max", "n")}
    head, _, rest = mmm(figure).partition(" ")
    value = f"**{head}** {rest}".rstrip()
    if t["met"]:
        return f"{value} {DASH} met"
    if t.get("missed_by") is None:
        return f"{value} {DASH} MISSED (nothing measured)"
    return (
        f"{value} {DASH} MISSED by {t['missed_by']:.2f} ({t['missed_by_pct']:.0f} % of the target)"
    )


def render(data: dict[str, Any]) -> str:
    load = data.get("load", {})
    lines = [
        machine_line(data),
        "",
        f"Single-request latency: {load.get('warmup', '?')} warm-up requests, then "
        f"{load.get('latency_requests', '?')} sequential requests per round; each figure is "
        f"the median (min{DASH}max) of {data.get('runs', '?')} rounds, measured as "
        f"{data.get('runs_are', 'runs').rstrip('.')}. Compute and queue are summed over "
        "each block's slowest tile; exchange is the rest of the latency (transfers, broker rounds, "
        "envelopes, the client's scatter and gather). kB sent: the most any one agent sent "
        "per request (tensor payloads, measured by the agents).",
        "",
    ]
    if not data.get("all_models", True):
        lines += [
            f"**Partial run: only {', '.join(data['models'])} measured so far.**",
            "",
        ]
    lines += [
        "| fleet | model | strategy | plan | p50 ms | p95 ms | predicted ms | "
        "compute / queue / exchange ms | kB sent |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in data["summary"]:
        plan = plan_shape(s["layouts"])
        if s["failed"]:
            plan += f" ({len(s['failed'])} failed: {s['failed'][0][:80]})"
        t = s["time"]
        split = " / ".join(
            f"{t[k]['median'] * 1e3:.0f}" if t[k]["n"] else "-"
            for k in ("compute_s", "queue_s", "exchange_s")
        )
        lines.append(
            f"| {s['fleet']} | {s['model']} | {s['strategy']} | {plan} | "
            f"{mmm(s['p50_s'], 1e3, 0)} | {mmm(s['p95_s'], 1e3, 0)} | "
            f"{mmm(s['predicted_latency_s'], 1e3, 0)} | {split} | {_most_sent(s)} |"
        )
    lines += [
        "",
        "The combined DP (edgeslice-dp) against the others, as ratios within each round:",
        "",
        "| fleet | model | DP p50 / monolithic p50 | speed-up over the best other | best other |",
        "|---|---|---|---|---|",
    ]
    for r in data["ratios"]:
        lines.append(
            f"| {r['fleet']} | {r['model']} | {mmm(r['dp_vs_monolithic'])} | "
            f"{mmm(r['speedup_vs_best_other'])} | {', '.join(r['best_others']) or '-'} |"
        )
    lines += ["", "Targets from the issue (CNNs), on the medians of the per-round ratios:", ""]
    for t in data["targets"]:
        rule = f"{RULES.get(t['rule'], t['rule'])} {t['threshold']:g}"
        lines.append(f"* {t['fleet']} / {t['model']}: {t['target']} ({rule}): {_target(t)}")
    return "\n".join(lines)
