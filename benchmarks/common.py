"""Shared benchmark plumbing: the machine description and writing results/NAME.json."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any

_SOURCE_RESULTS = Path(__file__).resolve().parent / "results"


def results_dir() -> Path:
    """Where results go: $EDGESLICE_BENCH_RESULTS, else benchmarks/results/ in a source
    checkout (the committed figures live there), else ./edgeslice-bench-results (an
    installed wheel has no results folder, and site-packages is no place to write)."""
    override = os.environ.get("EDGESLICE_BENCH_RESULTS")
    if override:
        return Path(override)
    return _SOURCE_RESULTS if _SOURCE_RESULTS.is_dir() else Path.cwd() / "edgeslice-bench-results"


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (0s where the OS has none): timings taken under
    load are slower and noisier, so results say what the load was."""
    try:
        return os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)


def machine() -> dict[str, Any]:
    """What the figures were measured on (every results file carries it), including the load
    average when the result was written."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_avg_1_5_15": list(load_average()),
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import psutil

        info["ram_bytes"] = psutil.virtual_memory().total
    except ImportError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def write_result(
    name: str, result: dict[str, Any], out_dir: Path | None = None, indent: int | None = 2
) -> Path:
    """Write ``{"benchmark", "machine", ...result}`` to results/NAME.json; returns the path.
    ``indent=None``: one line (a result with thousands of tile boxes stays small)."""
    directory = out_dir or results_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    rest = {k: v for k, v in result.items() if k not in ("benchmark", "machine")}
    body = {"benchmark": name, "machine": machine(), **rest}
    path.write_text(json.dumps(body, indent=indent, sort_keys=False) + "\n", encoding="utf-8")
    return path


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float]) -> dict[str, Any]:
    """``{"median", "min", "max", "n"}`` of repeated measurements of one figure (what every
    benchmark reports: the median of its runs with the min-max beside it)."""
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def rotated(items: list[Any], run: int) -> list[Any]:
    """``items`` starting at position ``run``: run r of an interleaved benchmark measures
    every item once, each item at a different place in the order in each run, so a drift
    in the machine's speed during a run does not always hit the same item first."""
    if not items:
        return []
    k = run % len(items)
    return items[k:] + items[:k]


def chart(
    name: str,
    rows: list[dict[str, Any]],
    label_key: str,
    metric: str,
    ylabel: str,
    out_dir: Path | None = None,
) -> Path | None:
    """A grouped bar chart results/NAME.png of ``measured[metric]`` per (fleet, model) group
    and ``label_key``; skipped with a note when matplotlib (the ``bench`` extra) is absent.
    A metric given as a :func:`spread` dict is drawn as its median with a min-max bar."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no chart: pip install matplotlib, or the 'bench' extra)")
        return None
    groups = sorted({f"{r.get('fleet', '')}/{r.get('model', '')}" for r in rows})
    labels = sorted({str(r[label_key]) for r in rows}, key=str)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) + 2), 4))
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        values, low, high = [], [], []
        for g in groups:
            match = [
                r
                for r in rows
                if f"{r.get('fleet', '')}/{r.get('model', '')}" == g and str(r[label_key]) == label
            ]
            value = match[0]["measured"][metric] if match else 0.0
            if isinstance(value, dict):
                mid = value["median"] or 0.0
                values.append(mid)
                low.append(mid - (value["min"] or mid))
                high.append((value["max"] or mid) - mid)
            else:
                values.append(value)
                low.append(0.0)
                high.append(0.0)
        xs = [x + i * width for x in range(len(groups))]
        bars: dict[str, Any] = {"yerr": [low, high], "capsize": 2} if any(low) or any(high) else {}
        ax.bar(xs, values, width, label=label, **bars)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))], groups, rotation=15)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = (out_dir or results_dir()) / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
