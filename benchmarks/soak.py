"""Soak: requests kept in flight on an emulated fleet while an agent dies and the broker restarts.

Bounded and self-stopping. A real mosquitto (``LocalBroker`` on a free port, restarted on
the same port), paced emulated agents behind their profiles' links (``lab.testbed``), one
planner and one :class:`InferenceClient` in this process keeping ``in_flight`` requests
outstanding (closed loop: each worker sends its next request when the last one is
answered) for ``duration_s``. At fixed fractions of the run one agent is killed with
SIGKILL, started again (same id, same link), and the broker is stopped and started on
its port (no persistence: the planner re-publishes what was retained). Then no new
requests are sent and the ones in flight get ``drain_s`` to finish.

Counts: sent, completed, failed (an ``infer`` that raised) and lost (sent, neither
completed nor failed by the end of the drain). Both must be 0: the process exits 1
otherwise, saying which. Latency p50/p95/p99 per window of completions (10 s), the
events on the same clock, every process's RSS at start (after warm-up), every window, at
the end and after ``idle_s`` without requests (agents trim malloc's kept memory when idle),
and the machine's load averages (other work on a shared host slows everything; the JSON
says how loaded it was). Results: results/soak.json (+ soak.png with the ``bench``
extra); ``--quick`` writes soak-quick.* (CI: ~24 s of load, 4 in flight, 3 agents).

Model: MobileNetV2 (the built-in, 602 KB input) on paced rpi4/rpi5 agents. Pacing holds
each stage for the board's time but computes at host speed, so four emulated boards
need far less than four host cores; the quick run uses the same model.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgeslice.benchmarks.common import load_average, results_dir, write_result
from edgeslice.lab.server import LocalBroker, free_port
from edgeslice.lab.testbed import Testbed, parse_fleet, wait_for_agents

MODEL = "mobilenetv2"


@dataclasses.dataclass(frozen=True)
class SoakConfig:
    agents: tuple[tuple[str, int], ...]  # (profile, count)
    in_flight: int
    duration_s: float
    window_s: float = 10.0
    kill_at: float = 0.2  # fractions of duration_s
    restart_at: float = 0.35
    broker_restart_at: float = 0.6
    broker_down_s: float = 1.0
    drain_s: float = 120.0
    request_timeout_s: float = 180.0
    idle_s: float = 4.0  # after the drain: RSS again once agents have been idle this long


FULL = SoakConfig(agents=(("rpi4-4gb", 2), ("rpi5-8gb", 2)), in_flight=16, duration_s=300.0)
QUICK = SoakConfig(
    agents=(("rpi4-4gb", 1), ("rpi5-8gb", 2)), in_flight=4, duration_s=24.0, window_s=4.0,
    idle_s=0.0,  # CI's time: no idle sample (it equals the end's)
)  # fmt: skip


@dataclasses.dataclass
class Tally:
    """What the load sent and got back, on the run's clock (seconds since load began)."""

    t0: float
    sent: int = 0
    completed: int = 0
    failed: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)
    done: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # (at, latency)
    events: list[tuple[float, str]] = dataclasses.field(default_factory=list)
    rss: list[tuple[float, dict[str, int | None]]] = dataclasses.field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.sent - self.completed - self.failed

    def event(self, what: str) -> None:
        at = time.monotonic() - self.t0
        self.events.append((round(at, 2), what))
        print(f"  t={at:6.1f}s  {what}  (sent {self.sent}, completed {self.completed})")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def windows(done: list[tuple[float, float]], width: float) -> list[dict[str, Any]]:
    """Completions per window of ``width`` s: count and p50/p95/p99 latency (None if empty)."""
    if not done:
        return []
    rows = []
    for i in range(int(max(at for at, _ in done) // width) + 1):
        lat = [lat for at, lat in done if i * width <= at < (i + 1) * width]
        stats = {
            f"p{q}_s": (round(percentile(lat, q / 100), 4) if lat else None) for q in (50, 95, 99)
        }
        rows.append(
            {"start_s": i * width, "end_s": (i + 1) * width, "completed": len(lat), **stats}
        )
    return rows


def rss(procs: dict[str, int | None]) -> dict[str, int | None]:
    """Resident set size in bytes per named pid (None: not running)."""
    import psutil

    out: dict[str, int | None] = {}
    for name, pid in sorted(procs.items()):
        try:
            out[name] = psutil.Process(pid).memory_info().rss if pid else None
        except psutil.Error:
            out[name] = None
    return out


def _pids(bed: Testbed, broker: LocalBroker) -> dict[str, int | None]:
    assert bed.fleet is not None
    pids = {name: child.pid for name, child in bed.fleet.procs.items() if child.is_running()}
    return {**pids, "broker": broker.pid, "client+benchmark": os.getpid()}


async def _load(
    bed: Testbed, broker: LocalBroker, cfg: SoakConfig, result: dict[str, Any]
) -> Tally:
    from edgeslice.broker.settings import parse_broker_url
    from edgeslice.client.inference import InferenceClient
    from edgeslice.planner.modelspec import load_model

    assert bed.fleet is not None
    fleet = bed.fleet
    inputs = load_model(MODEL).example_inputs
    settings = parse_broker_url(broker.url, bed.spec.namespace)
    async with InferenceClient(settings, MODEL) as client:
        first = await client.wait_ready(600)
        for _ in range(2):  # warm-up: every stage and replica runs once before timing
            await asyncio.gather(*(client.infer(inputs, timeout=300) for _ in range(cfg.in_flight)))
        result["first_plan"] = [list(s.agents) for s in first.stages]
        result["rss_start_bytes"] = await asyncio.to_thread(rss, _pids(bed, broker))
        tally = Tally(time.monotonic())
        stop = asyncio.Event()

        async def worker() -> None:
            while not stop.is_set():
                tally.sent += 1
                try:
                    res = await client.infer(inputs, timeout=cfg.request_timeout_s)
                except Exception as exc:  # counted: a failed request is a finding, not a crash
                    tally.failed += 1
                    tally.errors.append(repr(exc))
                    continue
                tally.completed += 1
                tally.done.append((time.monotonic() - tally.t0, res.latency_s))

        async def sample_rss() -> None:  # every window: does memory level off or keep growing?
            while not stop.is_set():
                now = round(time.monotonic() - tally.t0, 1)
                tally.rss.append((now, await asyncio.to_thread(rss, _pids(bed, broker))))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), cfg.window_s)

        workers = [asyncio.ensure_future(worker()) for _ in range(cfg.in_flight)]
        sampler = asyncio.ensure_future(sample_rss())
        victim = bed.agents[0]
        agent_cmd = fleet.procs[victim].cmd
        plan_before = client.plan

        async def at(fraction: float) -> None:
            delay = tally.t0 + fraction * cfg.duration_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

        await at(cfg.kill_at)
        tally.event(f"kill -9 agent {victim}")
        fleet.signal(victim, signal.SIGKILL)
        await at(cfg.restart_at)
        # the same command line: same id, same cache, same link proxy
        await asyncio.to_thread(fleet.spawn_module, victim, "edgeslice.lab.cli", agent_cmd[3:])
        tally.event(f"agent {victim} started again (pid {fleet.procs[victim].pid})")
        # its rss_start is the killed process's, its rss_end the new one's
        result["restarted_agent"] = victim
        await at(cfg.broker_restart_at)
        tally.event(f"broker stop (port {broker.port})")
        await asyncio.to_thread(broker.stop)
        await asyncio.sleep(cfg.broker_down_s)
        await asyncio.to_thread(broker.start)
        tally.event(f"broker started again (port {broker.port}, pid {broker.pid})")
        await at(1.0)
        stop.set()
        tally.event(f"load stops; {tally.sent - tally.completed - tally.failed} in flight drain")
        _, pending = await asyncio.wait(workers, timeout=cfg.drain_s)
        for task in pending:  # still unanswered after the drain: those requests are lost
            task.cancel()
        await asyncio.gather(*pending, sampler, return_exceptions=True)
        tally.event("drained" if not pending else f"{len(pending)} request(s) unanswered")
        plan = client.plan
        result["plan_versions"] = [
            plan_before.plan_version if plan_before else None,
            plan.plan_version if plan else None,
        ]
        result["last_plan"] = [list(s.agents) for s in plan.stages] if plan else []
        result["client_counters"] = {
            "resends": client.requests.resends,
            "duplicates_dropped": client.requests.duplicates,
            "stale_errors": client.requests.stale_errors,
        }
        result["rss_end_bytes"] = await asyncio.to_thread(rss, _pids(bed, broker))
        if cfg.idle_s:
            await asyncio.sleep(cfg.idle_s)  # agents give malloc's kept memory back when idle
        result["rss_idle_bytes"] = await asyncio.to_thread(rss, _pids(bed, broker))
        return tally


def _uptime() -> str:
    """``uptime``'s line (load averages: other work on a shared host slows everything)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def run(cfg: SoakConfig) -> dict[str, Any]:
    """Start broker + testbed + planner, run the load with its faults, stop everything."""
    agents = [{"profile": p, "count": n} for p, n in cfg.agents]
    broker = LocalBroker(port=free_port()).start()
    namespace = "soak" + os.urandom(3).hex()
    spec = parse_fleet(
        {"namespace": namespace, "broker": broker.url, "emulate_mode": "paced", "agents": agents},
        "soak",
    )
    result: dict[str, Any] = {
        "model": MODEL,
        "config": dataclasses.asdict(cfg),
        "broker": broker.kind,
        "emulate_mode": "paced",
        "load_avg_at_start": list(load_average()),
        "uptime_at_start": _uptime(),
    }
    workdir = tempfile.mkdtemp(prefix="edgeslice-soak-")
    bed = Testbed(spec, workdir)
    try:
        bed.up()
        assert bed.fleet is not None
        # the planner profiles the model while the agents start (--min-agents waits for all)
        bed.fleet.start_planner(
            MODEL, ["--replan-delay", "1", "--min-agents", str(len(bed.agents))]
        )
        asyncio.run(wait_for_agents(broker.url, namespace, bed.agents, timeout=120))
        tally = asyncio.run(_load(bed, broker, cfg, result))
    except BaseException:
        if bed.fleet is not None:
            for name in ("planner", *bed.agents):
                print(f"--- {name} log tail ---\n{bed.fleet.log_tail(name, 20)}", file=sys.stderr)
        raise
    finally:
        bed.down()
        broker.stop()
    lat = [lat for _, lat in tally.done]
    result.update(
        sent=tally.sent,
        completed=tally.completed,
        failed=tally.failed,
        lost=tally.lost,
        errors=tally.errors[:10],
        throughput_rps=round(tally.completed / cfg.duration_s, 3),
        latency_s={f"p{q}": round(percentile(lat, q / 100), 4) for q in (50, 95, 99)}
        if lat
        else {},
        events=tally.events,
        windows=windows(tally.done, cfg.window_s),
        rss_over_time_mib=[
            {"at_s": at, **{k: round(v / 2**20, 1) if v else None for k, v in row.items()}}
            for at, row in tally.rss
        ],
        load_avg_at_end=list(load_average()),
        uptime_at_end=_uptime(),
    )
    return result


def plot(name: str, result: dict[str, Any], out_dir: Path | None = None) -> Path | None:
    """results/NAME.png: p50/p95/p99 per window with the fault events marked; skipped
    with a note when matplotlib (the ``bench`` extra) is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no chart: pip install matplotlib, or the 'bench' extra)")
        return None
    rows = [w for w in result["windows"] if w["p50_s"] is not None]
    fig, ax = plt.subplots(figsize=(9, 4))
    mid = [(w["start_s"] + w["end_s"]) / 2 for w in rows]
    for q, style in (("p50", "-o"), ("p95", "-s"), ("p99", "-^")):
        ax.plot(mid, [w[f"{q}_s"] for w in rows], style, markersize=3, label=q)
    for at, what in result["events"]:
        if "kill" in what or "started again" in what or "broker stop" in what:
            ax.axvline(at, color="grey", linestyle=":", linewidth=1)
            ax.text(at, ax.get_ylim()[1] * 0.97, what, rotation=90, fontsize=6, va="top")
    ax.set_xlabel("seconds since load began")
    ax.set_ylabel("latency (s)")
    ax.set_title(
        f"soak: {result['model']}, {result['config']['in_flight']} in flight; sent "
        f"{result['sent']}, failed {result['failed']}, lost {result['lost']}",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = (out_dir or results_dir()) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(quick: bool = False) -> None:
    cfg = QUICK if quick else FULL
    name = "soak-quick" if quick else "soak"
    fleet = ", ".join(f"{n} x {p}" for p, n in cfg.agents)
    print(f"soak: {MODEL} on {fleet} (paced), {cfg.in_flight} in flight for {cfg.duration_s:.0f}s")
    result = run(cfg)
    path = write_result(name, result)
    plot(name, result)
    mib = 1024 * 1024
    for who in sorted(result["rss_end_bytes"]):
        start = result["rss_start_bytes"].get(who)
        end = result["rss_end_bytes"][who]
        idle = result["rss_idle_bytes"].get(who)
        print(
            f"  RSS {who:>18}: {start / mib if start else 0:7.1f} MiB -> "
            f"{end / mib if end else 0:7.1f} MiB, idle {idle / mib if idle else 0:7.1f} MiB"
        )
    lat = result["latency_s"]
    print(
        f"soak: sent {result['sent']}, completed {result['completed']}, failed "
        f"{result['failed']}, lost {result['lost']}; latency p50 {lat.get('p50')} s, p95 "
        f"{lat.get('p95')} s, p99 {lat.get('p99')} s; {result['throughput_rps']} req/s; "
        f"load {result['load_avg_at_start']} -> {result['load_avg_at_end']}; wrote {path}"
    )
    problems = [f"{k}={result[k]}" for k in ("failed", "lost") if result[k]]
    if problems:
        print(f"soak FAILED: {', '.join(problems)} (must be 0); errors: {result['errors'][:3]}")
        raise SystemExit(1)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
