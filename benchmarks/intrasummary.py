"""Owns the intra-layer benchmark's strategies, summaries, ratios, targets and time chart.

:mod:`intralayer` measures; this module says what was measured (the planner flags of each
strategy) and what it amounts to: per (fleet, model, strategy) the median and min-max of
the runs (p50, p95, predicted latency, where the time went, the worst block prediction),
per run the combined DP's ratios against monolithic and against the best other strategy
of the same run (summarised the same way), the issue's targets checked on those medians,
and a stacked bar chart of compute / queue / exchange per strategy.
"""

from __future__ import annotations

from typing import Any

from edgeslice.benchmarks.common import results_dir, spread

MODELS = ["mobilenetv2", "resnet18", "vgg", "transformer"]
CNNS = ("mobilenetv2", "resnet18", "vgg")
OURS = "edgeslice-dp"
LATENCY = ["--objective", "latency"]
# strategy -> planner flags (benchmarks/intralayer.py's docstring says what each is)
STRATEGIES: dict[str, list[str]] = {
    "monolithic": ["--strategy", "monolithic", *LATENCY],
    "outc": ["--intra-layer", "outc", *LATENCY],
    "inh": ["--intra-layer", "inh", *LATENCY],
    "grid": ["--intra-layer", "grid", *LATENCY],
    "fixed-fusion": ["--intra-layer", "fixed", *LATENCY],
    "pipeline": LATENCY,
    OURS: ["--intra-layer", "dp", *LATENCY],
}
BEATS = 1.0  # the DP's p50 speed-up over the best other strategy, per CNN: above this
BEATS_ONE = 1.3  # ... and at least this on one CNN
BELOW_MONOLITHIC = 1.0  # DP p50 / monolithic p50 on every CNN: below this
RESNET_HOMOGENEOUS = 0.5  # ... and at most this for resnet18 on 4 x rpi4


def fmt(figure: dict[str, Any], scale: float = 1.0, digits: int = 2) -> str:
    if not figure.get("n"):
        return "-"
    med, lo, hi = (figure[k] * scale for k in ("median", "min", "max"))
    return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def _ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if "measured" in r]


def layout(blocks: list[dict[str, Any]]) -> str:
    """A plan's shape, e.g. ``grid 0-7, grid 7-11, whole 19-23`` (runs of whole blocks
    on one agent are one entry)."""
    parts = []
    for b in blocks:
        start, end = b["segments"]
        parts.append(f"{b['strategy']} {start}-{end}")
    return ", ".join(parts)


def order(key: tuple[str, str, str]) -> tuple[int, int, int]:
    fleet, model, strategy = key
    fleets = ["homogeneous", "heterogeneous"]
    names = list(STRATEGIES)
    return (
        fleets.index(fleet) if fleet in fleets else len(fleets),
        MODELS.index(model) if model in MODELS else len(MODELS),
        names.index(strategy) if strategy in names else len(names),
    )


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (fleet, model, strategy): median and min-max over its runs."""
    out = []
    for fleet, model, strategy in sorted(
        {(r["fleet"], r["model"], r["strategy"]) for r in rows}, key=order
    ):
        runs = [
            r for r in rows if (r["fleet"], r["model"], r["strategy"]) == (fleet, model, strategy)
        ]
        ok = _ok(runs)
        agents = sorted({a for r in ok for a in r["sent_bytes_per_request"]})
        out.append(
            {
                "fleet": fleet,
                "model": model,
                "strategy": strategy,
                "runs": len(runs),
                "failed": [r["error"] for r in runs if "error" in r],
                "layouts": sorted({layout(r["blocks"]) for r in ok}),
                "blocks": spread([len(r["blocks"]) for r in ok]),
                "whole_blocks": sorted({str(r["whole_blocks"]) for r in ok}),
                "p50_s": spread([r["measured"]["p50_s"] for r in ok]),
                "p95_s": spread([r["measured"]["p95_s"] for r in ok]),
                "predicted_latency_s": spread([r["predicted_latency_s"] for r in ok]),
                "latency_error_pct": spread(
                    [100 * (r["predicted_latency_s"] / r["measured"]["p50_s"] - 1) for r in ok]
                ),
                "time": {
                    k: spread([r["time"][k] for r in ok])
                    for k in ("compute_s", "queue_s", "exchange_s")
                },
                "worst_block_error_pct": spread(
                    [
                        max(abs(b["error_pct"]) for b in bs)
                        for r in ok
                        if (bs := [b for b in r["measured_blocks"] if "error_pct" in b])
                    ]
                ),
                "all_tiles_timed": all(
                    b["all_tiles_timed"] for r in ok for b in r["measured_blocks"]
                ),
                "sent_bytes_per_request": {
                    a: spread([r["sent_bytes_per_request"].get(a, 0) for r in ok]) for a in agents
                },
                "max_abs_error_vs_whole_model": max(
                    (r["max_abs_error_vs_whole_model"] for r in ok), default=None
                ),
            }
        )
    return out


def compact(
    rows: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Rows without what the rounds of one plan and the rows of one testbed share: the
    plans' blocks once per ``plan_id`` (``plans``) and the devices once per ``fleet/model``
    (``devices``: each model gets a fresh testbed). Lossless: a row's blocks are
    ``plans[row["plan_id"]]``, its devices ``devices[f"{fleet}/{model}"]``."""
    plans: dict[str, Any] = {}
    devices: dict[str, Any] = {}
    out = []
    for r in rows:
        r = dict(r)
        if "blocks" in r:
            plans.setdefault(r["plan_id"], r.pop("blocks"))
        if "devices" in r:
            devices.setdefault(f"{r['fleet']}/{r['model']}", r.pop("devices"))
        out.append(r)
    return out, plans, devices


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (fleet, model): the DP's p50 / monolithic's and the best other strategy's p50 /
    the DP's (its speed-up), computed within each run, then median and min-max."""
    out = []
    ok = _ok(rows)
    for fleet, model in sorted(
        {(r["fleet"], r["model"]) for r in ok}, key=lambda k: order((*k, ""))
    ):
        per_run = []
        for run in sorted({r["run"] for r in ok}):
            group = {
                r["strategy"]: r["measured"]["p50_s"]
                for r in ok
                if (r["fleet"], r["model"], r["run"]) == (fleet, model, run)
            }
            if OURS not in group:
                continue
            entry: dict[str, Any] = {"run": run}
            if "monolithic" in group:
                entry["dp_vs_monolithic"] = group[OURS] / group["monolithic"]
            others = {k: v for k, v in group.items() if k != OURS}
            if others:
                best = min(others, key=lambda k: others[k])
                entry["best_other"] = best
                entry["speedup_vs_best_other"] = others[best] / group[OURS]
            per_run.append(entry)
        out.append(
            {
                "fleet": fleet,
                "model": model,
                "per_run": per_run,
                "best_others": sorted({e["best_other"] for e in per_run if "best_other" in e}),
                "dp_vs_monolithic": spread(
                    [e["dp_vs_monolithic"] for e in per_run if "dp_vs_monolithic" in e]
                ),
                "speedup_vs_best_other": spread(
                    [e["speedup_vs_best_other"] for e in per_run if "speedup_vs_best_other" in e]
                ),
            }
        )
    return out


def _check(
    fleet: str, model: str, wording: str, figure: dict[str, Any], threshold: float, rule: str
) -> dict[str, Any]:
    value = figure.get("median")
    met = (
        value is not None
        and {
            ">": value > threshold,
            ">=": value >= threshold,
            "<": value < threshold,
            "<=": value <= threshold,
        }[rule]
    )
    entry = {
        "fleet": fleet,
        "model": model,
        "target": wording,
        "threshold": threshold,
        "rule": rule,
        **{k: figure.get(k) for k in ("median", "min", "max", "n")},
        "met": met,
    }
    if value is not None and not met:
        entry["missed_by"] = abs(threshold - value)
        entry["missed_by_pct"] = 100.0 * abs(threshold - value) / threshold
    return entry


def targets(ratio_rows: list[dict[str, Any]], quick: bool = False) -> list[dict[str, Any]]:
    """The issue's targets on the medians of the per-run ratios (CNNs only; the transformer
    is reported, not targeted)."""
    out = []
    cnn = [g for g in ratio_rows if g["model"] in CNNS]
    for g in cnn:
        out.append(
            _check(
                g["fleet"],
                g["model"],
                "DP faster than the best other strategy",
                g["speedup_vs_best_other"],
                BEATS,
                ">",
            )
        )
        out.append(
            _check(
                g["fleet"],
                g["model"],
                "DP p50 below monolithic's",
                g["dp_vs_monolithic"],
                BELOW_MONOLITHIC,
                "<",
            )
        )
        if g["fleet"] == "homogeneous" and g["model"] == "resnet18":
            out.append(
                _check(
                    g["fleet"],
                    g["model"],
                    "DP p50 <= 0.5 x monolithic's",
                    g["dp_vs_monolithic"],
                    RESNET_HOMOGENEOUS,
                    "<=",
                )
            )
    scored = [g for g in cnn if g["speedup_vs_best_other"]["n"]]
    if scored:
        top = max(scored, key=lambda g: g["speedup_vs_best_other"]["median"])
        out.append(
            _check(
                top["fleet"],
                top["model"],
                f"DP >= {BEATS_ONE}x the best other strategy on at least one CNN "
                "(the best CNN shown)",
                top["speedup_vs_best_other"],
                BEATS_ONE,
                ">=",
            )
        )
    return out


def chart_time(name: str, summary: list[dict[str, Any]]) -> Any:
    """results/NAME.png: per (fleet, model) a panel, per strategy a bar of the median p50
    split into compute, queue and exchange (median of each part; min-max of p50 as error
    bar). Skipped with a note when matplotlib (the ``bench`` extra) is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no chart: pip install matplotlib, or the 'bench' extra)")
        return None
    rows = [s for s in summary if s["p50_s"]["n"]]
    groups = list(dict.fromkeys((s["fleet"], s["model"]) for s in rows))
    if not groups:
        return None
    cols = min(4, len(groups))
    nrows = -(-len(groups) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.4 * nrows), squeeze=False)
    parts = [
        ("compute_s", "compute (critical tiles)"),
        ("queue_s", "queue"),
        ("exchange_s", "exchange (transfers, broker, scatter/gather)"),
    ]
    for ax, (fleet, model) in zip(axes.flat, groups, strict=False):
        mine = [s for s in rows if (s["fleet"], s["model"]) == (fleet, model)]
        xs = range(len(mine))
        bottom = [0.0] * len(mine)
        for key, label in parts:
            heights = [1e3 * (s["time"][key]["median"] or 0.0) for s in mine]
            ax.bar(xs, heights, bottom=bottom, label=label)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        p50 = [1e3 * s["p50_s"]["median"] for s in mine]
        low = [p - 1e3 * s["p50_s"]["min"] for p, s in zip(p50, mine, strict=True)]
        high = [1e3 * s["p50_s"]["max"] - p for p, s in zip(p50, mine, strict=True)]
        ax.errorbar(xs, p50, yerr=[low, high], fmt="k_", capsize=2, label="p50 (min-max)")
        ax.set_xticks(list(xs), [s["strategy"] for s in mine], rotation=60, fontsize=7)
        ax.set_title(f"{fleet} / {model}", fontsize=9)
        ax.set_ylabel("ms")
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    path = results_dir() / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
