"""The benchmarks' --quick modes run through `edgeslice bench`, so they keep working."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "name",
    [
        "planner",
        "transport",
        "dispatch",
        "strategies",
        "scaling",
        "simulation",
        "soak",
        "intralayer",
    ],
)
def test_quick_benchmark_writes_results_with_machine(name: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "edgeslice.lab.cli", "bench", name, "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((ROOT / "benchmarks" / "results" / f"{name}-quick.json").read_text())
    assert result["benchmark"] == f"{name}-quick"
    assert result["machine"]["cpu_count"] >= 1
    if name == "transport":
        assert all(row["chunked_MBps"] > 0 and row["raw_MBps"] > 0 for row in result["rows"])
        assert all(len(row["runs"]) == result["runs"] >= 1 for row in result["rows"])
        assert len(result["machine"]["load_avg_1_5_15"]) == 3
    if name == "dispatch":
        assert result["runs"] >= 3 and len(result["run_results"]) == result["runs"]
        assert result["per_request_ms"]["total"]["median_ms"] > 0
    if name == "simulation":
        assert result["simulated"] is True and "SIMULATED" in result["note"]
    if name == "soak":  # an agent killed and restarted, the broker restarted: nothing lost
        assert result["failed"] == 0 and result["lost"] == 0, result["errors"]
        assert result["completed"] == result["sent"] > 0
        assert [w for w in result["windows"] if w["completed"]]
        assert set(result["rss_start_bytes"]) <= set(result["rss_end_bytes"])
        assert any("broker started again" in what for _, what in result["events"])
    if name in ("strategies", "scaling"):  # measured on an emulated fleet, every row complete
        rows = result["rows"]
        assert rows and all("measured" in r and r["measured"]["throughput_rps"] > 0 for r in rows)
        assert all(r["all_outputs_finite"] for r in rows)
        # quick: one run, labelled; every row says which run it belongs to
        assert result["runs"] == 1 and all(r["run"] == 0 for r in rows)
        assert result["load_1m_during"]["n"] == len(rows)
    if name == "strategies":
        assert all(s["measured"]["throughput_rps"]["n"] == 1 for s in result["summary"])
        assert result["ratios"][0]["vs_monolithic_throughput"]["n"] == 1
    if name == "scaling":
        assert [s["devices"] for s in result["sizes"]] == [1, 2]
    if name == "intralayer":  # vgg on 2 paced rpi4s: monolithic, inh only, the DP
        rows = result["rows"]
        assert {r["strategy"] for r in rows} == {"monolithic", "inh", "edgeslice-dp"}
        assert all("measured" in r and r["measured"]["p50_s"] > 0 for r in rows), rows
        assert all(r["max_abs_error_vs_whole_model"] < 1e-3 for r in rows)
        assert all(b["all_tiles_timed"] for r in rows for b in r["measured_blocks"])
        assert all(sum(r["sent_bytes_per_request"].values()) > 0 for r in rows)
        tiled = next(r for r in rows if r["strategy"] == "inh")
        assert {b["strategy"] for b in result["plans"][tiled["plan_id"]]} <= {"inh", "whole"}
        assert all(len(b["tiles"]) == 2 for b in result["plans"][tiled["plan_id"]][:-1])
        assert result["runs"] == 1 and "rounds" in result["runs_are"]
        assert [t["model"] for t in result["targets"]] and result["ratios"][0]["model"] == "vgg"
    if name == "planner":
        assert all(r["min_ms"] <= r["median_ms"] <= r["max_ms"] for r in result["timing"])
