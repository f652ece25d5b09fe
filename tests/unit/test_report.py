"""The README's results blocks are what benchmarks/report.py makes of the committed JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeslice.benchmarks import report
from edgeslice.benchmarks.common import spread

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"


def test_readme_results_blocks_match_the_committed_json() -> None:
    current, fresh = report.regenerate(README, RESULTS)
    names = ["planner", "strategies", "simulation", "scaling", "intralayer"]
    assert report.marked_names(current) == names
    assert current == fresh, (
        "README.md results blocks differ from benchmarks/results/*.json: do not edit them by "
        "hand; run `python -m edgeslice.benchmarks.report`"
    )


def test_rendering_is_deterministic() -> None:
    first = report.render_blocks(RESULTS)
    second = report.render_blocks(RESULTS)
    assert first == second and set(first) == set(report.RENDERERS)


def _strategies_result(quick: bool) -> dict[str, object]:
    runs = 1 if quick else 3
    thr = [4.0, 4.2, 3.9][:runs]
    ours = [13.0, 14.0, 12.5][:runs]
    return {
        "machine": {
            "date": "2026-11-30T12:00:00+00:00",
            "cpu_model": "Test CPU",
            "cpu_count": 2,
            "python": "3.11.7",
            "load_avg_1_5_15": [1.25, 1.5, 1.75],
        },
        "quick": quick,
        "runs": runs,
        "elapsed_s": 1500.0,
        "load_1m_during": spread([1.0, 2.0]),
        "load": {
            "latency_requests": 6,
            "in_flight_per_device": 2,
            "window_requests": 10,
            "window_s": 3.0,
        },
        "summary": [
            {
                "fleet": "homogeneous",
                "model": "resnet18",
                "strategy": name,
                "runs": runs,
                "failed": [],
                "stages": [layout],
                "measured": {
                    "p50_s": spread([0.2] * runs),
                    "p95_s": spread([0.3] * runs),
                    "throughput_rps": spread(values),
                },
            }
            for name, layout, values in (
                ("monolithic", "1 stage x 1 agents", thr),
                ("edgeslice-throughput", "1 stage x 4 agents", ours),
            )
        ],
        "ratios": [
            {
                "fleet": "homogeneous",
                "model": "resnet18",
                "best_baselines": ["monolithic"],
                "vs_monolithic_throughput": spread([o / t for o, t in zip(ours, thr, strict=True)]),
            }
        ],
        "targets": [
            {
                "fleet": "homogeneous",
                "model": "resnet18",
                "target": "throughput >= 3.6x monolithic",
                **spread([o / t for o, t in zip(ours, thr, strict=True)]),
                "met": False,
                "missed_by": 0.35,
                "missed_by_pct": 9.7,
            }
        ],
    }


def test_strategies_block_gives_median_min_max_machine_and_misses() -> None:
    text = report.render_strategies(_strategies_result(quick=False))
    assert "Measured 2026-11-30 12:00:00 UTC, on Test CPU, 2 cores" in text
    assert "load average 1.2 / 1.5 / 1.8 (1/5/15 min)" in text
    assert "1-min load 1.0\u20132.0 during the runs; 3 runs per figure" in text
    assert (
        "| homogeneous | resnet18 | monolithic | 1 stage x 1 agents | 200 (200\u2013200) |" in text
    )
    assert "| 4.00 (3.90\u20134.20) |" in text
    assert "MISSED by 0.35 (10 % short of the target)" in text


def test_a_quick_run_is_labelled_as_one_run() -> None:
    text = report.render_strategies(_strategies_result(quick=True))
    assert "1 run per figure (quick run)" in text
    assert "4.00 (1 run)" in text


def _intralayer_result() -> dict[str, object]:
    def row(strategy: str, p50: list[float], layout: str) -> dict[str, object]:
        return {
            "fleet": "homogeneous",
            "model": "resnet18",
            "strategy": strategy,
            "runs": 3,
            "failed": [],
            "layouts": [layout],
            "p50_s": spread(p50),
            "p95_s": spread([x * 1.1 for x in p50]),
            "predicted_latency_s": spread([0.3] * 3),
            "time": {
                "compute_s": spread([0.2] * 3),
                "queue_s": spread([0.001] * 3),
                "exchange_s": spread([0.05] * 3),
            },
            "sent_bytes_per_request": {"a": spread([4000.0] * 3), "b": spread([2e5] * 3)},
        }

    return {
        "machine": {"date": "2026-11-30T12:00:00+00:00", "cpu_model": "Test CPU",
                    "cpu_count": 2, "python": "3.11.7"},
        "runs": 3,
        "runs_are": "back-to-back rounds within one plan",
        "load": {"warmup": 2, "latency_requests": 8},
        "all_models": False,
        "models": ["resnet18"],
        "summary": [
            row("monolithic", [0.44, 0.45, 0.43], "whole 0-23"),
            row("edgeslice-dp", [0.36, 0.37, 0.35], "grid 0-8, grid 8-13, whole 13-23"),
        ],
        "ratios": [
            {"fleet": "homogeneous", "model": "resnet18", "best_others": ["monolithic"],
             "dp_vs_monolithic": spread([0.82, 0.8, 0.84]),
             "speedup_vs_best_other": spread([1.2, 1.19, 1.25])},
        ],
        "targets": [
            {"fleet": "homogeneous", "model": "resnet18", "target": "DP p50 <= 0.5 x "
             "monolithic's", "threshold": 0.5, "rule": "<=", "median": 0.82, "min": 0.8,
             "max": 0.84, "n": 3, "met": False, "missed_by": 0.32, "missed_by_pct": 64.0},
            {"fleet": "homogeneous", "model": "resnet18", "target": "DP p50 below "
             "monolithic's", "threshold": 1.0, "rule": "<", "median": 0.82, "min": 0.8,
             "max": 0.84, "n": 3, "met": True},
        ],
    }  # fmt: skip


def test_intralayer_block_gives_plans_medians_ratios_and_misses() -> None:
    text = report.render_intralayer(_intralayer_result())
    assert text.startswith("Measured 2026-11-30 12:00:00 UTC, on Test CPU, 2 cores")
    assert "measured as back-to-back rounds within one plan" in text
    assert "**Partial run: only resnet18 measured so far.**" in text
    assert (
        "| homogeneous | resnet18 | edgeslice-dp | 3 blocks: grid \u00d72, whole \u00d71 | "
        "360 (350\u2013370) | 396 (385\u2013407) | 300 (300\u2013300) | 200 / 1 / 50 | "
        "200 (200\u2013200) |" in text
    )
    assert "| homogeneous | resnet18 | 0.82 (0.80\u20130.84) | 1.20 (1.19\u20131.25) |" in text
    assert (
        "DP p50 <= 0.5 x monolithic's (at most 0.5): **0.82** (0.80\u20130.84) \u2013 "
        "MISSED by 0.32 (64 % of the target)" in text
    )
    assert "DP p50 below monolithic's (below 1): **0.82** (0.80\u20130.84) \u2013 met" in text


def test_replace_blocks_touches_only_what_is_between_the_markers() -> None:
    readme = (
        "intro\n<!-- results:scaling:start -->\nold table\n<!-- results:scaling:end -->\nafter\n"
    )
    out = report.replace_blocks(readme, {"scaling": "| new |"})
    note = report.GENERATED.format(name="scaling")
    assert out == (
        f"intro\n<!-- results:scaling:start -->\n{note}\n\n| new |\n\n"
        "<!-- results:scaling:end -->\nafter\n"
    )
    assert report.replace_blocks(out, {"scaling": "| new |"}) == out
    with pytest.raises(report.ReportError):
        report.replace_blocks("<!-- results:scaling:start -->\n", {"scaling": "x"})


def test_check_fails_on_a_hand_edited_figure(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "strategies.json").write_text(json.dumps(_strategies_result(quick=False)))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- results:strategies:start -->\n<!-- results:strategies:end -->\n")
    args = ["--readme", str(readme), "--results", str(results)]
    assert report.main([*args, "--check"]) == 1
    assert report.main(args) == 0
    assert report.main([*args, "--check"]) == 0
    readme.write_text(readme.read_text().replace("4.00 (3.90", "4.50 (3.90"))
    assert report.main([*args, "--check"]) == 1
