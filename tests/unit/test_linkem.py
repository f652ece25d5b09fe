"""Link emulation, the pure parts: specs from profiles, pacing, delay-line order, seeded loss."""

from __future__ import annotations

import asyncio
import math

import pytest

from edgeslice.broker.protocol.errors import ConfigError
from edgeslice.firmware_profiles import load_profile
from edgeslice.lab.linkem import LinkProxy
from edgeslice.lab.linkproc import main
from edgeslice.lab.linkshape import (
    MSS,
    DelayLine,
    LinkSpec,
    LossModel,
    Pacer,
    is_loopback,
    piece_size,
)


# -- LinkSpec -----------------------------------------------------------------------------
def test_spec_from_profile_units() -> None:
    spec = LinkSpec.from_mbit(8, 20, 1.5)
    assert spec.bandwidth_bps == 1_000_000  # 8 Mbit/s is 1 MB/s
    assert spec.latency_s == pytest.approx(0.020)
    assert spec.loss_pct == 1.5
    assert spec.rtt_s == pytest.approx(0.040)
    assert spec.describe() == "8 Mbit/s, 20 ms one-way, 1.5 % loss"


def test_spec_from_a_shipped_profile_and_from_its_table() -> None:
    profile = load_profile("rpi3b")
    spec = LinkSpec.from_profile_link(profile.link)
    assert spec.bandwidth_bps == pytest.approx(profile.link.bandwidth_mbit * 1e6 / 8)
    assert spec.latency_s == pytest.approx(profile.link.latency_ms / 1000)
    assert spec.loss_pct == profile.link.loss_pct
    table = {"kind": "wifi", "bandwidth_mbit": 25.0, "latency_ms": 3.0}
    assert LinkSpec.from_profile_link(table) == LinkSpec(25e6 / 8, 0.003, 0.0)


def test_unlimited_bandwidth() -> None:
    for spec in (LinkSpec(), LinkSpec(0.0), LinkSpec.from_mbit(0, 5)):
        assert spec.unlimited
        assert spec.describe().startswith("unlimited")
    assert not LinkSpec(1.0).unlimited


def test_retransmission_timeout_is_at_least_linux_minimum() -> None:
    assert LinkSpec(latency_s=0.001).retransmit_timeout_s == 0.2
    assert LinkSpec(latency_s=0.1).retransmit_timeout_s == pytest.approx(0.4)  # 2 x RTT


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"bandwidth_bps": -1.0}, "bandwidth_bps"),
        ({"bandwidth_bps": math.nan}, "bandwidth_bps"),
        ({"latency_s": -0.001}, "latency_s"),
        ({"latency_s": math.inf}, "latency_s"),
        ({"loss_pct": 100.0}, "loss_pct"),
        ({"loss_pct": -1.0}, "loss_pct"),
        ({"loss_pct": True}, "loss_pct"),
    ],
)
def test_bad_spec_names_the_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        LinkSpec(**kwargs)


def test_bad_profile_tables_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="latency_ms"):
        LinkSpec.from_profile_link({"bandwidth_mbit": 10.0})
    with pytest.raises(ConfigError, match=r"\[link\].*bandwidth_mbit"):
        LinkSpec.from_profile_link({"bandwidth_mbit": "fast", "latency_ms": 1.0})
    with pytest.raises(ConfigError, match="loss_pct"):
        LinkSpec.from_profile_link({"bandwidth_mbit": 10.0, "latency_ms": 1.0, "loss_pct": 150})


# -- pacing -------------------------------------------------------------------------------
def test_pacer_serialises_back_to_back_pieces_at_the_bandwidth() -> None:
    pacer = Pacer(1_000_000)  # 1 MB/s: 1000 bytes take 1 ms
    assert [pacer.schedule(0.0, 1000) for _ in range(3)] == pytest.approx([0.001, 0.002, 0.003])
    # An idle link does not bank time: a piece after a pause starts when it arrives.
    assert pacer.schedule(1.0, 500) == pytest.approx(1.0005)


def test_pacer_credit_absorbs_late_wakeups_so_the_long_run_rate_is_exact() -> None:
    bandwidth, piece = 1_000_000.0, 4096
    pacer = Pacer(bandwidth, burst_bytes=piece)
    now, sent = 0.0, 0
    for _ in range(1000):  # a reader that always wakes 0.5 ms after the link is free again
        done = pacer.schedule(now, piece)
        sent += piece
        now = done + 0.0005
    assert (sent - piece) / done == pytest.approx(bandwidth, rel=1e-6)  # one piece of burst
    strict = Pacer(bandwidth)  # without credit every oversleep is lost link time
    now = 0.0
    for _ in range(1000):
        done = strict.schedule(now, piece)
        now = done + 0.0005
    assert sent / done < 0.9 * bandwidth


def test_unlimited_pacer_never_delays() -> None:
    pacer = Pacer(math.inf, burst_bytes=10)
    assert pacer.schedule(3.0, 10**9) == 3.0


def test_piece_size_is_a_few_milliseconds_of_link_time_within_bounds() -> None:
    assert piece_size(1_000_000) == 4096  # 4 ms would be 4000 bytes: the floor applies
    assert piece_size(12_500_000) == 50_000  # 100 Mbit/s
    assert piece_size(1e12) == 256 * 1024
    assert piece_size(math.inf) == piece_size(0) == 256 * 1024


# -- delay line ---------------------------------------------------------------------------
def test_delay_line_delivers_after_the_latency_in_order() -> None:
    line: DelayLine[str] = DelayLine(0.020)
    assert line.push(0.000, "a", 10) == pytest.approx(0.020)
    assert line.push(0.001, "b", 20) == pytest.approx(0.021)
    assert line.bytes_queued == 30
    assert line.pop_due(0.0199) == []
    assert line.pop_due(0.0205) == ["a"]
    assert line.next_due() == pytest.approx(0.021)
    assert line.pop_due(1.0) == ["b"]
    assert line.bytes_queued == 0
    assert line.next_due() is None


def test_a_held_back_piece_blocks_everything_behind_it() -> None:
    line: DelayLine[int] = DelayLine(0.010)
    line.push(0.000, 1, 1)
    line.push(0.001, 2, 1, extra_s=0.200)  # a retransmission timeout
    line.push(0.002, 3, 1)  # sent later, must not overtake 2
    assert line.pop_due(0.050) == [1]
    assert line.pop_due(0.210) == []
    assert line.pop_due(0.2115) == [2, 3]


def test_many_pieces_in_flight_at_once() -> None:
    """Latency adds delay, not a per-piece wait: 100 pieces sent 1 ms apart arrive 1 ms apart."""
    line: DelayLine[int] = DelayLine(0.050)
    dues = [line.push(i * 0.001, i, 1) for i in range(100)]
    assert dues[-1] == pytest.approx(0.149)
    assert line.pop_due(0.0995) == list(range(50))


# -- loss ---------------------------------------------------------------------------------
def _pattern(seed: int, n: int = 500) -> list[float]:
    model = LossModel(2.0, 0.2, seed)
    return [model.penalty(MSS) for _ in range(n)]


def test_loss_pattern_repeats_for_a_seed() -> None:
    assert _pattern(7) == _pattern(7)
    assert _pattern(7) != _pattern(8)
    assert set(_pattern(7)) == {0.0, 0.2}


def test_loss_rate_is_per_segment_not_per_read() -> None:
    """A 10-segment piece is held back if any segment is lost: 1 - 0.99**10, about 9.6 %."""
    one = LossModel(1.0, 0.2, seed=1)
    ten = LossModel(1.0, 0.2, seed=1)
    for _ in range(20_000):
        one.penalty(MSS)
        ten.penalty(10 * MSS)
    assert one.held_back / 20_000 == pytest.approx(0.01, abs=0.003)
    assert ten.held_back / 20_000 == pytest.approx(1 - 0.99**10, abs=0.01)


def test_no_loss_never_holds_back() -> None:
    model = LossModel(0.0, 0.2, seed=1)
    assert all(model.penalty(10**6) == 0.0 for _ in range(1000))
    assert model.held_back == 0


# -- addresses and flags ------------------------------------------------------------------
def test_loopback_detection() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "192.168.1.10", "example.org", "::"]))


def test_proxy_refuses_a_non_loopback_listen_address() -> None:
    async def start() -> None:
        await LinkProxy().start("0.0.0.0", 0, "127.0.0.1", 1883, LinkSpec())

    with pytest.raises(ConfigError, match="loopback"):
        asyncio.run(start())


def test_process_form_rejects_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--target", "no-port-here"]) == 2
    assert "HOST:PORT" in capsys.readouterr().out
    assert main(["--target", "127.0.0.1:1883", "--loss-pct", "100"]) == 2
    assert "loss_pct" in capsys.readouterr().out
