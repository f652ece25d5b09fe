"""The cost model: worked examples by hand, and the DP's table agreeing with the reference."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeslice.planner.costmodel import (
    CostParams,
    Device,
    ModelCost,
    Segment,
    client_period_s,
    compute_s,
    fit_correction,
    fits,
    hop_constants,
    hop_cpu_time_s,
    link_occupancy_s,
    num_chunks,
    stage_cpu_s,
    stage_memory_bytes,
    stage_period_s,
    transfer_s,
)
from edgeslice.planner.costtable import CostTable

# per_message 1.12 ms per chunk, broker round 2.02 ms, hop CPU 1.11 ms per side at
# 100 GFLOP/s, chunk 262144 B, memory x1.5, min_compute 0.2 ms
PARAMS = CostParams()


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
    # 600 kB: upload 0.6 s + download 0.3 s + RTT halves 0.005 + 0.01 + broker round
    # 0.00202 + 3 chunks (600000 / 262144 -> 3) x 1.12 ms = 0.00336 + hop CPU 1.11 ms at
    # 100 GFLOP/s on each 10 GFLOP/s side = 2 x 0.0111  =>  0.94258 s.
    assert num_chunks(600_000, PARAMS) == 3
    assert hop_cpu_time_s(600_000, src, PARAMS) == pytest.approx(0.0111)
    assert transfer_s(600_000, src, dst, PARAMS) == pytest.approx(0.94258)
    # Both sides' CPU and link occupancy plus the broker round and RTT halves: the same.
    split = sum(
        f(600_000, d, PARAMS) for f in (link_occupancy_s, hop_cpu_time_s) for d in (src, dst)
    )
    assert split + 0.015 + 0.00202 == pytest.approx(0.94258)


def test_client_link_and_cpu_and_a_local_handoff_is_free() -> None:
    params = CostParams(client_bandwidth_bps=100e6, client_rtt_s=0.0005)
    # client -> device: 1e6 B at 100 MB/s = 0.01 + at 1 MB/s = 1.0, RTT halves 0.00025 + 0.005,
    # 4 chunks x 1.12 ms = 0.00448, broker 0.00202, CPU: client 0.00111 (reference speed)
    # + device 0.0111  =>  1.03396 s.
    assert transfer_s(1_000_000, None, dev(), params) == pytest.approx(1.03396)
    assert transfer_s(1_000_000, dev("a"), dev("a"), params) == 0.0


def test_the_client_period_is_its_busiest_resource() -> None:
    # Input 1000 B up, output 300 B down, one chunk each: uplink 1e-5 + 0.00056; CPU packs
    # and unpacks, 2 x 1.11 ms, the largest.
    assert client_period_s(MODEL, PARAMS) == pytest.approx(0.00222)
    big = ModelCost("big", 600_000, MODEL.segments)  # 3 chunks at 100 MB/s: 6 ms + 1.68 ms
    assert client_period_s(big, PARAMS) == pytest.approx(0.006 + 0.00168)
    slow = CostParams(client_bandwidth_bps=1e6)
    assert client_period_s(big, slow) == pytest.approx(0.6 + 0.00168)


def test_a_stage_period_is_cpu_or_a_link_whichever_is_busier() -> None:
    d = dev(bw=1e6)
    # CPU: receive 1000 B + compute 0.3002 + send 300 B; hop sides 2 x 0.0111.
    assert stage_cpu_s(MODEL, 0, 2, d, PARAMS) == pytest.approx(0.3002 + 0.0222)
    assert stage_period_s(MODEL, 0, 2, d, PARAMS) == pytest.approx(0.3224)
    thin = dev(bw=1e3)  # downlink 1000 B / 1e3 = 1 s + 0.00056: the link sets the pace
    assert stage_period_s(MODEL, 0, 2, thin, PARAMS) == pytest.approx(1.00056)


# benchmarks/results/transport.json of 2026-11-23 (mosquitto, this 2-core host): the
# measurement the default hop constants were fitted to (a later re-run may differ).
TRANSPORT_ROWS = [
    {"size_mib": 1, "chunk_bytes": 262144, "chunked_s": 0.0087008, "raw_s": 0.0069817},
    {"size_mib": 16, "chunk_bytes": 262144, "chunked_s": 0.0756254, "raw_s": 0.0813360},
    {"size_mib": 64, "chunk_bytes": 262144, "chunked_s": 0.4075008, "raw_s": 0.3283851},
]


def test_hop_constants_are_the_fit_to_the_transport_benchmark() -> None:
    rows = TRANSPORT_ROWS
    fitted = hop_constants(rows)
    for name, value in fitted.items():
        assert getattr(PARAMS, name) == pytest.approx(value, rel=0.02, abs=1e-9), name
    with pytest.raises(ValueError, match="two different sizes"):
        hop_constants(rows[:1])


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


def test_fit_correction_weights_a_reported_mean_by_its_requests() -> None:
    # An agent's telemetry reports one mean per stage with how many requests it covers:
    # 24 requests at ratio 0.8 -> weight 24 / 27, close to the measured ratio.
    fitted = fit_correction([("a", 0.25, 0.2, 24)])
    assert fitted["a"] == pytest.approx(0.8 ** (24 / 27))
    assert abs(0.25 * fitted["a"] / 0.2 - 1) < 0.03
    # Two stages: the request-weighted median follows the busier one.
    both = fit_correction([("b", 0.1, 0.2, 30), ("b", 0.1, 0.1, 3)], prior_samples=0)
    assert both["b"] == pytest.approx(2.0)


def test_fit_correction_ignores_bad_samples_and_clamps() -> None:
    samples = [("a", 0.0, 1.0), ("a", 0.1, -1.0), ("a", math.nan, 1.0), ("b", 1.0, 1e6)] * 50
    result = fit_correction(samples)
    assert "a" not in result
    assert result["b"] == 10.0
    assert fit_correction([("c", 0.1, 0.2, 0)]) == {}


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
            cpu = stage_cpu_s(model, i, j, device, PARAMS)
            assert table.cpu(i, j, 0) == pytest.approx(cpu, rel=1e-9, abs=1e-12)
            assert table.fits(i, j, 0) == fits(model, i, j, device, PARAMS)
    # Latency splits by stage: the client's halves + each stage's share.
    whole = (
        transfer_s(input_bytes, None, device, PARAMS)
        + compute_s(model, 0, n, device, PARAMS)
        + transfer_s(model.output_bytes, device, None, PARAMS)
    )
    assert table.client_s + table.latency(0, n, 0) == pytest.approx(whole, rel=1e-9)
    assert table.client_period == client_period_s(model, PARAMS)
    if n >= 2:  # two stages on two devices: each hop's latency lands on the stages
        other = Device("zz", device.gflops * 2, 10**12, device.bandwidth_bps, device.rtt_s)
        pair = CostTable(model, [device, other], PARAMS)
        two = (
            transfer_s(input_bytes, None, device, PARAMS)
            + compute_s(model, 0, 1, device, PARAMS)
            + transfer_s(model.segments[0].out_bytes, device, other, PARAMS)
            + compute_s(model, 1, n, other, PARAMS)
            + transfer_s(model.output_bytes, other, None, PARAMS)
        )
        got = pair.client_s + pair.latency(0, 1, 0) + pair.latency(1, n, 1)
        assert got == pytest.approx(two, rel=1e-9)
