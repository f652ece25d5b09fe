"""The cost model: worked examples by hand, and the DP's table agreeing with the reference."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeslice.planner.costmodel import (
    CostParams,
    CostTable,
    Device,
    ModelCost,
    Segment,
    compute_s,
    fit_correction,
    fits,
    link_occupancy_s,
    num_chunks,
    stage_memory_bytes,
    stage_period_s,
    transfer_s,
)

PARAMS = CostParams()  # per_message 2 ms, chunk 262144 B, memory x1.5, min_compute 0.2 ms


def dev(
    name: str = "a",
    gflops: float = 10.0,
    mem: int = 10**9,
    bw: float = 1e6,
    rtt: float = 0.01,
    load: float = 0.0,
) -> Device:
    return Device(name, gflops, mem, bw, rtt, load)


MODEL = ModelCost(
    "m",
    input_bytes=1000,
    segments=(
        Segment(flops=2e9, param_bytes=100, out_bytes=500, act_bytes=50),
        Segment(flops=1e9, param_bytes=200, out_bytes=300, act_bytes=80),
    ),
)


def test_compute_is_flops_over_rate_plus_fixed_overhead() -> None:
    # 3e9 FLOP at 10 GFLOP/s = 0.3 s, + 0.0002 s per stage.
    assert compute_s(MODEL, 0, 2, dev(), PARAMS) == pytest.approx(0.3002)
    # Only the second segment: 1e9 / 10e9 = 0.1 s.
    assert compute_s(MODEL, 1, 2, dev(), PARAMS) == pytest.approx(0.1002)


def test_load_slows_compute_and_the_slowdown_is_capped() -> None:
    # load 0.5 -> 1 / (1 - 0.5) = 2x: 0.6 s + 0.0002.
    assert compute_s(MODEL, 0, 2, dev(load=0.5), PARAMS) == pytest.approx(0.6002)
    # load 1.0 would divide by zero; the cap is 10x: 3.0 s + 0.0002.
    assert compute_s(MODEL, 0, 2, dev(load=1.0), PARAMS) == pytest.approx(3.0002)


def test_fitted_correction_multiplies_compute_for_that_agent_only() -> None:
    params = CostParams(correction={"a": 1.5})
    assert compute_s(MODEL, 0, 2, dev("a"), params) == pytest.approx(0.3 * 1.5 + 0.0002)
    assert compute_s(MODEL, 0, 2, dev("b"), params) == pytest.approx(0.3002)


def test_transfer_goes_through_the_broker() -> None:
    src, dst = dev("s", bw=1e6, rtt=0.01), dev("d", bw=2e6, rtt=0.02)
    # 600 kB: upload 0.6 s + download 0.3 s + RTT halves 0.005 + 0.01
    # + 3 chunks (600000 / 262144 -> 3) x 2 ms = 0.006  => 0.921 s.
    assert num_chunks(600_000, PARAMS) == 3
    assert transfer_s(600_000, src, dst, PARAMS) == pytest.approx(0.921)
    # Occupancy of each link plus the RTT halves is the same total.
    split = link_occupancy_s(600_000, src, PARAMS) + link_occupancy_s(600_000, dst, PARAMS)
    assert split + 0.015 == pytest.approx(0.921)


def test_client_uses_the_fast_local_link_and_a_local_handoff_is_free() -> None:
    params = CostParams(client_bandwidth_bps=100e6, client_rtt_s=0.0005)
    # client -> device: 1e6 B at 100 MB/s = 0.01 + at 1 MB/s = 1.0, RTT halves 0.00025 + 0.005,
    # 4 chunks x 2 ms = 0.008  => 1.02325 s.
    assert transfer_s(1_000_000, None, dev(), params) == pytest.approx(1.02325)
    assert transfer_s(1_000_000, dev("a"), dev("a"), params) == 0.0


def test_stage_memory_is_weights_plus_peak_activation_with_headroom() -> None:
    # (100 + 200 params) + max(50, 80) activation = 380, x1.5 = 570.
    assert stage_memory_bytes(MODEL, 0, 2, PARAMS) == 570
    assert fits(MODEL, 0, 2, dev(mem=570), PARAMS)
    assert not fits(MODEL, 0, 2, dev(mem=569), PARAMS)


def test_a_stage_outside_the_model_is_refused() -> None:
    with pytest.raises(ValueError, match="not inside model 'm'"):
        compute_s(MODEL, 1, 3, dev(), PARAMS)
    with pytest.raises(ValueError):
        stage_memory_bytes(MODEL, 1, 1, PARAMS)


def test_fit_correction_is_a_shrunk_median_per_agent() -> None:
    assert fit_correction([]) == {}
    # One sample, ratio 2, prior 3 samples: exp(1/4 * ln 2) = 2 ** 0.25.
    assert fit_correction([("a", 0.1, 0.2)]) == {"a": pytest.approx(2**0.25)}
    # Nine samples at ratio 1.5 and one stray 100x: the median ignores the stray;
    # weight 10 / 13 -> 1.5 ** (10 / 13).
    samples = [("b", 0.2, 0.3)] * 9 + [("b", 0.2, 20.0)]
    assert fit_correction(samples)["b"] == pytest.approx(1.5 ** (10 / 13))


def test_fit_correction_ignores_bad_samples_and_clamps() -> None:
    samples = [("a", 0.0, 1.0), ("a", 0.1, -1.0), ("a", math.nan, 1.0), ("b", 1.0, 1e6)] * 50
    result = fit_correction(samples)
    assert "a" not in result
    assert result["b"] == 10.0


segments = st.builds(
    Segment,
    flops=st.floats(0, 1e10),
    param_bytes=st.integers(0, 10**8),
    out_bytes=st.integers(0, 10**7),
    act_bytes=st.integers(0, 10**7),
)
devices = st.builds(
    Device,
    agent_id=st.sampled_from("abcdef"),
    gflops=st.floats(0.1, 100),
    memory_bytes=st.integers(0, 10**9),
    bandwidth_bps=st.floats(1e4, 1e9),
    rtt_s=st.floats(0, 0.1),
    load=st.floats(0, 1),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(segments, min_size=1, max_size=6), devices, st.integers(0, 10**6))
def test_cost_table_agrees_with_the_reference_functions(segs, device, input_bytes) -> None:
    model = ModelCost("m", input_bytes, tuple(segs))
    table = CostTable(model, [device], PARAMS)
    n = len(segs)
    for i in range(n):
        for j in range(i + 1, n + 1):
            want = stage_period_s(model, i, j, device, PARAMS)
            assert table.period(i, j, 0) == pytest.approx(want, rel=1e-9, abs=1e-12)
            assert table.fits(i, j, 0) == fits(model, i, j, device, PARAMS)
    # Latency splits by stage: the client's halves + each stage's share.
    whole = (
        transfer_s(input_bytes, None, device, PARAMS)
        + compute_s(model, 0, n, device, PARAMS)
        + transfer_s(model.output_bytes, device, None, PARAMS)
    )
    assert table.client_s + table.latency(0, n, 0) == pytest.approx(whole, rel=1e-9)
