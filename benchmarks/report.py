"""Owns the README's results blocks: renders them from benchmarks/results/*.json.

``python -m edgeslice.benchmarks.report`` rewrites every block of README.md between
``<!-- results:NAME:start -->`` and ``<!-- results:NAME:end -->`` from results/NAME.json
(NAME: planner, strategies, simulation, scaling, intralayer -- that one's renderer is
benchmarks/intrareport.py); ``--check`` rewrites nothing and exits 1
when README.md differs from what the JSON gives (a hand-edited figure fails CI). The text
is a pure function of the JSON: the same files give the same bytes. Each block says when
and on what the figures were measured (the JSON's machine description and load average),
gives every measured figure as median (min-max) of its runs, and says by how much a
target from the issue was missed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
START = "<!-- results:{name}:start -->"
END = "<!-- results:{name}:end -->"
GENERATED = (
    "<!-- generated from benchmarks/results/{name}.json by "
    "`python -m edgeslice.benchmarks.report`: re-run it, do not edit by hand -->"
)
DASH = "\u2013"  # en dash between min and max, as in the rest of the README


class ReportError(Exception):
    """A block that cannot be rendered or placed (missing JSON, unbalanced markers)."""


# -- formatting --------------------------------------------------------------------------


def mmm(figure: dict[str, Any], scale: float = 1.0, digits: int = 2, signed: bool = False) -> str:
    """``median (min-max)`` of a :func:`common.spread`; ``median (1 run)`` for a single run;
    ``signed``: ``+6 (-18 to +7)`` for figures that may be negative."""
    if not figure or not figure.get("n"):
        return "-"
    spec = f"+.{digits}f" if signed else f".{digits}f"
    med = format(figure["median"] * scale, spec)
    if figure["n"] == 1:
        return f"{med} (1 run)"
    lo, hi = (format(figure[k] * scale, spec) for k in ("min", "max"))
    return f"{med} ({lo} to {hi})" if signed else f"{med} ({lo}{DASH}{hi})"


def machine_line(data: dict[str, Any]) -> str:
    """When and on what: date, CPU, cores, Python, torch, load average, runs, duration."""
    m = data.get("machine", {})
    date = str(m.get("date", "?")).replace("T", " ").replace("+00:00", " UTC")
    parts = [
        f"Measured {date}",
        f"on {m.get('cpu_model', m.get('machine', '?'))}, {m.get('cpu_count', '?')} cores",
        f"Python {m.get('python', '?')}" + (f", torch {m['torch']}" if "torch" in m else ""),
    ]
    text = ", ".join(parts)
    load = m.get("load_avg_1_5_15")
    if load:
        text += "; load average " + " / ".join(f"{x:.1f}" for x in load) + " (1/5/15 min)"
        text += " when the results were written"
    during = data.get("load_1m_during")
    if during and during.get("n"):
        text += f", 1-min load {during['min']:.1f}{DASH}{during['max']:.1f} during the runs"
    runs = data.get("runs")
    if runs:
        text += f"; {runs} run{'s' if runs != 1 else ''} per figure"
        if data.get("quick"):
            text += " (quick run)"
    if "elapsed_s" in data:
        text += f"; the whole benchmark took {data['elapsed_s'] / 60:.0f} min"
    return text + "."


def _target_text(t: dict[str, Any], digits: int = 2, unit: str = "") -> str:
    """``**value** (min-max) -- met`` or ``-- MISSED by x (y % of the target)``."""
    figure = {k: t.get(k) for k in ("median", "min", "max", "n")}
    head, _, rest = mmm(figure, digits=digits).partition(" ")
    value = f"**{head}{unit}** {rest}".rstrip()
    if t["met"]:
        return f"{value} {DASH} met"
    if t.get("missed_by") is None:
        return f"{value} {DASH} MISSED (nothing measured)"
    if unit == " %":  # a threshold in per cent: missed by so many points
        return f"{value} {DASH} MISSED by {t['missed_by']:.{digits}f} points"
    side = "short of" if t.get("higher_is_better", True) else "over"
    return (
        f"{value} {DASH} MISSED by {t['missed_by']:.{digits}f}{unit} "
        f"({t['missed_by_pct']:.0f} % {side} the target)"
    )


# -- blocks ------------------------------------------------------------------------------


def render_strategies(data: dict[str, Any]) -> str:
    runs = data.get("runs", 1)
    load = data.get("load", {})
    lines = [
        machine_line(data),
        "",
        f"Each figure is the median (min{DASH}max) of {runs} runs, interleaved: every run "
        "measures every strategy once, in an order rotated from run to run. p50/p95 from "
        f"{load.get('latency_requests', '?')} sequential requests per run; throughput is the "
        f"steady-state rate at {load.get('in_flight_per_device', '?')} requests in flight per "
        "device the plan uses (at least "
        f"{load.get('window_requests', '?')} completions over at least "
        f"{load.get('window_s', '?')} s, after the pipeline has filled).",
        "",
        *(
            []
            if data.get("all_models", True)
            else [
                "**Partial re-measurement: this run measured only "
                f"{', '.join(data['models'])}; the other models have no current figures.**",
                "",
            ]
        ),
        "| fleet | model | strategy | plan | p50 ms | p95 ms | req/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in data["summary"]:
        m = s["measured"]
        plan = "; ".join(s["stages"]) or "-"
        if s["failed"]:
            plan += f" ({len(s['failed'])} of {s['runs']} runs failed)"
        lines.append(
            f"| {s['fleet']} | {s['model']} | {s['strategy']} | {plan} | "
            f"{mmm(m['p50_s'], 1e3, 0)} | {mmm(m['p95_s'], 1e3, 0)} | "
            f"{mmm(m['throughput_rps'])} |"
        )
    lines += [
        "",
        "edgeslice-throughput against the baselines, as ratios computed within each run:",
        "",
        "| fleet | model | req/s vs monolithic | req/s vs best baseline | "
        "p50 vs that baseline | best baseline |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["ratios"]:
        lines.append(
            f"| {r['fleet']} | {r['model']} | {mmm(r.get('vs_monolithic_throughput', {}))} | "
            f"{mmm(r.get('vs_best_baseline_throughput', {}))} | "
            f"{mmm(r.get('vs_best_baseline_p50', {}))} | "
            f"{', '.join(r.get('best_baselines', [])) or '-'} |"
        )
    lines += ["", "Targets from the issue, on the medians of the per-run ratios:", ""]
    for t in data["targets"]:
        percent = "within" in t["target"]  # the prediction error, in %
        text = _target_text(t, 1 if percent else 2, " %" if percent else "")
        lines.append(f"* {t['fleet']} / {t['model']}: {t['target']}: {text}")
    return "\n".join(lines)


def render_scaling(data: dict[str, Any]) -> str:
    lines = [
        f"**Scaling** (`edgeslice bench scaling`, {data['model']}: emulated rpi4-4gb devices "
        f"join one by one, one planner re-plans; each of the {data['runs']} runs is a fresh "
        "sweep, ratios are computed within each sweep, figures are median (min"
        f"{DASH}max) of the runs). " + machine_line(data),
        "",
        "| devices | plan | req/s | vs one device | vs one fewer | predicted req/s | "
        "prediction error |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in data["sizes"]:
        lines.append(
            f"| {s['devices']} | {'; '.join(s['stages'])} | {mmm(s['throughput_rps'])} | "
            f"{mmm(s['speedup_vs_one'])} | "
            f"{mmm(s['vs_previous']) if s['devices'] > 1 else '-'} | "
            f"{mmm(s['predicted_throughput_rps'])} | "
            f"{mmm(s['prediction_error_pct'], digits=0, signed=True)} % |"
        )
    lines += ["", "Targets from the issue:", ""]
    monotonic, predicted = data["targets"]
    step = monotonic["worst_step_ratio"]
    text = "met" if monotonic["met"] else "MISSED"
    detail = f"worst median step \u00d7{step:.2f}" if step is not None else "nothing measured"
    if not monotonic["met"] and step is not None:
        detail += f", a drop of {100 * (1 - step):.0f} %"
    lines.append(
        f"* {monotonic['target']}: {text} ({detail}; "
        f"{monotonic['runs_monotonic']} of {monotonic['runs']} sweeps monotonic)"
    )
    worst = predicted["worst_abs_error_pct"]
    if worst is None:
        lines.append(f"* {predicted['target']}: MISSED (nothing measured)")
    elif predicted["met"]:
        lines.append(f"* {predicted['target']}: met (worst {worst:.1f} %)")
    else:
        lines.append(
            f"* {predicted['target']}: MISSED by {worst - 10.0:.1f} points (worst {worst:.1f} %)"
        )
    return "\n".join(lines)


def render_planner(data: dict[str, Any]) -> str:
    worst = data["timing_100_cuts_16_devices_worst_row"]
    opt = data["optimality_vs_brute_force"]
    checked = [v for v in opt.values() if isinstance(v, dict) and "max_gap_pct" in v]
    gaps = [v["max_gap_pct"] for v in checked]
    instances = sum(v["instances"] for v in checked)
    heur = data["heuristic_vs_exact_dp"]
    return (
        f"**Planner** (`edgeslice bench planner`): 100 cut points x 16 heterogeneous devices "
        f"plans in {worst['median_ms']:.0f} ms (worst median of both objectives, "
        f"{worst['min_ms']:.0f}{DASH}{worst['max_ms']:.0f} ms over {worst['repeats']} "
        f"run{'s' if worst['repeats'] != 1 else ''}; "
        f"latency objective <= {data['timing_worst_ms']['latency']:.1f} ms over the whole "
        f"grid); gap to brute force at most {max(gaps, default=0.0):.1f} % on every instance "
        f"small enough to enumerate ({instances} instances); throughput heuristics vs the "
        f"exact DP: at most {heur['max_gap_pct']:.2f} % "
        f"worse, optimal in {100 * heur['optimal_share']:.0f} % of {heur['instances']} instances. "
        f"Planning time is deterministic work, so only its timing is repeated. "
        + machine_line(data)
    )


def render_simulation(data: dict[str, Any]) -> str:
    ratios = [s["vs_best_baseline"] for s in data["summary"] if s["vs_best_baseline"]]
    sizes = sorted({s["devices"] for s in data["summary"]})
    text = (
        "**Simulation beyond this machine** (`edgeslice bench simulation`; **SIMULATED**, "
        "not measured: `lab/simulate.py` runs each plan request by request through the "
        "planner's own cost model with per-device CPU/uplink/downlink queues and the "
        f"client's link; devices at their profiles' rated speed and links): on fleets of "
        f"{sizes[0]}{DASH}{sizes[-1]} devices, edgeslice's throughput plan is "
        f"{min(ratios):.2f}{DASH}{max(ratios):.2f}\u00d7 the best baseline "
        f"(homogeneous rpi4 and a mixed rpi3b/rpi4/rpi5/jetson-nano fleet; MobileNetV2, "
        "ResNet-18, transformer). The simulated figures are deterministic (fixed seeds)."
    )
    v = data.get("validation", {})
    if v.get("available"):
        runs = len({r.get("run", 0) for r in v["rows"]})
        text += (
            f" Checked against the {len(v['rows'])} measured rows of the strategies benchmark "
            f"({runs} run{'s' if runs != 1 else ''}), the simulator's throughput is off by a "
            "median "
            f"{v['median_abs_throughput_error_pct']:.0f} % (p50: "
            f"{v['median_abs_p50_error_pct']:.0f} %); with a per-agent compute correction "
            f"fitted on the same runs, {v['median_abs_corrected_throughput_error_pct']:.0f} % "
            f"(p50: {v['median_abs_corrected_p50_error_pct']:.0f} %)."
        )
    return text + " Computed " + machine_line(data).removeprefix("Measured ")


def render_intralayer(data: dict[str, Any]) -> str:
    from edgeslice.benchmarks.intrareport import render

    return render(data)


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "planner": render_planner,
    "strategies": render_strategies,
    "simulation": render_simulation,
    "scaling": render_scaling,
    "intralayer": render_intralayer,
}


# -- README ------------------------------------------------------------------------------


def render_blocks(results: Path = RESULTS, names: list[str] | None = None) -> dict[str, str]:
    """Each block's text from results/NAME.json (missing files raise ReportError)."""
    out = {}
    for name in names or list(RENDERERS):
        path = results / f"{name}.json"
        if not path.exists():
            raise ReportError(f"{path} not found: run `edgeslice bench {name}` first")
        out[name] = RENDERERS[name](json.loads(path.read_text(encoding="utf-8")))
    return out


def marked_names(readme: str) -> list[str]:
    """The block names README.md has markers for, in order."""
    names = []
    for name in RENDERERS:
        if START.format(name=name) in readme:
            names.append(name)
    return names


def replace_blocks(readme: str, blocks: dict[str, str]) -> str:
    """``readme`` with each marked block's content replaced by ``blocks[name]``."""
    for name, body in blocks.items():
        start, end = START.format(name=name), END.format(name=name)
        if readme.count(start) != 1 or readme.count(end) != 1:
            raise ReportError(f"README needs exactly one {start} and one {end}")
        head, _, rest = readme.partition(start)
        _, _, tail = rest.partition(end)
        if end in head:
            raise ReportError(f"{end} comes before {start}")
        note = GENERATED.format(name=name)
        readme = f"{head}{start}\n{note}\n\n{body.strip()}\n\n{end}{tail}"
    return readme


def regenerate(readme_path: Path = README, results: Path = RESULTS) -> tuple[str, str]:
    """(current README text, README text with every marked block regenerated)."""
    current = readme_path.read_text(encoding="utf-8")
    return current, replace_blocks(current, render_blocks(results, marked_names(current)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edgeslice.benchmarks.report", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is stale")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    try:
        current, fresh = regenerate(args.readme, args.results)
    except ReportError as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if current != fresh:
            print(
                f"report: {args.readme} results blocks differ from {args.results}/*.json; "
                "run `python -m edgeslice.benchmarks.report`",
                file=sys.stderr,
            )
            return 1
        return 0
    if current != fresh:
        args.readme.write_text(fresh, encoding="utf-8")
        print(f"report: rewrote {', '.join(marked_names(current))} in {args.readme}")
    else:
        print(f"report: {args.readme} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
