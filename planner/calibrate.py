"""Owns a calibration run and its file: ask every online agent to sweep, collect, save, load.

``edgeslice calibrate`` (planner/calibrate_cli.py) builds the layer list (the seeded
:func:`~broker.layerspec.sweep_set`, plus the distinct layers of any ``--model``, each
model's its own holdout group), times the same layers on this host for the timed baseline,
sends every usable agent ``cmd/sweep`` (agent/sweep.py) and waits for all the answers
(:func:`collect`, one progress line per agent). :class:`Calibration` is the result, saved
as JSON: layers, per-agent device figures and measured seconds, the host's figures, and
the holdout table for people to read. Nothing executable or pickled is stored: the planner
retrains the trees from the samples when it loads the file (:func:`load`), which takes
about a second.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeslice.broker.fleetstate import FleetState
from edgeslice.broker.layerspec import LayerSpec
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.errors import ConfigError, EdgesliceError
from edgeslice.broker.protocol.messages import Command, CommandResult
from edgeslice.broker.protocol.topics import Topics
from edgeslice.broker.transport import Transport
from edgeslice.planner.learned import DeviceFeatures, LayerSample, sweep_group

log = logging.getLogger(__name__)

FORMAT = "edgeslice-calibration"
VERSION = 1
ANSWER_GRACE_S = 60.0  # beyond the sweep budget: warm-ups, a slow link, a busy host


@dataclass(frozen=True)
class SweepLayer:
    """One layer of the sweep, its holdout group and its time on the calibrating host."""

    spec: LayerSpec
    group: str
    host_s: float | None = None


def sweep_layers(
    sweep: Sequence[LayerSpec], models: Mapping[str, Sequence[LayerSpec]]
) -> list[SweepLayer]:
    """Model layers first (group ``model:<name>``, first model wins a shared layer), then
    the sweep's layers that no model has (group by kind and width band)."""
    out: dict[LayerSpec, SweepLayer] = {}
    for name, specs in models.items():
        for spec in specs:
            out.setdefault(spec, SweepLayer(spec, f"model:{name}"))
    for spec in sweep:
        out.setdefault(spec, SweepLayer(spec, sweep_group(spec)))
    return list(out.values())


@dataclass
class Calibration:
    """A calibration run: what was swept, what each agent measured, this host's figures."""

    layers: list[SweepLayer]
    agents: dict[str, dict[str, Any]] = field(default_factory=dict)  # device figures, status
    measured: list[tuple[int, str, float]] = field(default_factory=list)  # layer, agent, s
    reference_gflops: float = 0.0  # this host's one-thread calibration rate (timed baseline)
    created: float = 0.0
    host: str = ""
    holdout: dict[str, Any] = field(default_factory=dict)  # for people; recomputed on load

    def samples(self) -> list[LayerSample]:
        """Every measured (layer, device) pair as a training sample."""
        out = []
        for index, agent, seconds in self.measured:
            layer, dev = self.layers[index], self.agents[agent]
            device = DeviceFeatures(float(dev["gflops"]), int(dev["memory_budget_bytes"]))
            out.append(
                LayerSample(layer.spec, device, seconds, agent, layer.group, host_s=layer.host_s)
            )
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "created": self.created,
            "host": self.host,
            "reference_gflops": self.reference_gflops,
            "agents": self.agents,
            "layers": [
                {"spec": x.spec.to_wire(), "group": x.group, "host_s": x.host_s}
                for x in self.layers
            ],
            "samples": [[i, a, s] for i, a, s in self.measured],
            "holdout": self.holdout,
        }

    @classmethod
    def from_json(cls, data: Any, source: str = "<json>") -> Calibration:
        """Parse and check a calibration file's content; ConfigError naming what is wrong."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ConfigError(f"{source} is not an edgeslice calibration file")
        if data.get("version") != VERSION:
            raise ConfigError(
                f"{source}: calibration file version {data.get('version')!r}, "
                f"this edgeslice reads {VERSION}; run `edgeslice calibrate` again"
            )
        try:
            layers = [
                SweepLayer(
                    LayerSpec.from_wire(x["spec"]),
                    str(x["group"]),
                    None if x.get("host_s") is None else float(x["host_s"]),
                )
                for x in data["layers"]
            ]
            agents = {str(k): dict(v) for k, v in data["agents"].items()}
            measured = [(int(i), str(a), float(s)) for i, a, s in data["samples"]]
            for i, a, s in measured:
                if not 0 <= i < len(layers) or a not in agents or not s > 0:
                    raise ValueError(f"sample {[i, a, s]} names no layer/agent or has no time")
            for name in {a for _, a, _ in measured}:
                dev = agents[name]
                if float(dev["gflops"]) <= 0 or int(dev["memory_budget_bytes"]) < 0:
                    raise ValueError(f"agent {name!r} has no calibrated rate")
            return cls(
                layers,
                agents,
                measured,
                float(data.get("reference_gflops", 0.0)),
                float(data.get("created", 0.0)),
                str(data.get("host", "")),
                dict(data.get("holdout", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: malformed calibration file: {exc}") from exc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")


def load(path: str | Path) -> Calibration:
    """Read a calibration file (ConfigError when missing or malformed)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read calibration file {path}: {exc}") from exc
    return Calibration.from_json(data, str(path))


def time_on_host(layers: Sequence[SweepLayer], repeats: int = 3) -> tuple[list[SweepLayer], float]:
    """The layers timed here with one thread, fastest of ``repeats`` (the planner's way,
    planner/timing.py), and this host's one-thread calibration GFLOP/s."""
    import torch

    from edgeslice.broker.calibration import measure_gflops
    from edgeslice.broker.layerrun import time_layer

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        timed = [
            SweepLayer(x.spec, x.group, time_layer(x.spec, repeats, reduce="min")) for x in layers
        ]
    finally:
        torch.set_num_threads(previous)
    return timed, measure_gflops(0.5, threads=1)


async def usable_agents(
    client: Transport, topics: Topics, min_agents: int, wait_s: float
) -> list[str]:
    """Usable agents once at least ``min_agents`` are (after 1 s for the retained view)."""
    fleet = FleetState(topics)
    await client.subscribe(topics.all_agents("status"), qos=1)
    await client.subscribe(topics.all_agents("info"), qos=1)
    start = time.monotonic()
    while True:
        elapsed = time.monotonic() - start
        if elapsed >= 1.0 and len(fleet.usable_ids()) >= min_agents:
            return sorted(fleet.usable_ids())
        if elapsed >= wait_s:
            raise EdgesliceError(
                f"only {len(fleet.usable_ids())} agent(s) online after {wait_s:.0f} s, "
                f"wanted {min_agents}: {sorted(fleet.usable_ids()) or 'none'}"
            )
        msg = await client.next_message(0.2)
        if msg is not None:
            with contextlib.suppress(EdgesliceError):  # garbage: not an agent we can ask
                fleet.apply(msg.topic, msg.payload, time.time())


async def collect(
    client: Transport,
    topics: Topics,
    agents: Sequence[str],
    layers: Sequence[SweepLayer],
    repeats: int,
    budget_s: float,
    echo: Callable[[str], None],
) -> tuple[dict[str, dict[str, Any]], list[tuple[int, str, float]]]:
    """Ask ``agents`` to sweep ``layers``; (agent figures, [(layer, agent, seconds)])."""
    args = {"layers": [x.spec.to_wire() for x in layers], "repeats": repeats, "budget_s": budget_s}
    asked: dict[str, str] = {}  # request id -> agent
    for agent in agents:
        await client.subscribe(topics.cmd_result(agent, "sweep"), qos=1)
    for agent in agents:
        cmd = Command(
            uuid.uuid4().hex, "sweep", args, f"calibrate-{socket.gethostname()}", time.time()
        )
        asked[cmd.request_id] = agent
        await client.publish(topics.cmd(agent, "sweep"), codec.encode(cmd), qos=1)
    echo(
        f"asked {len(agents)} agent(s) to time {len(layers)} layers x {repeats} "
        f"(budget {budget_s:.0f} s each)"
    )
    figures: dict[str, dict[str, Any]] = {}
    measured: list[tuple[int, str, float]] = []
    deadline = time.monotonic() + budget_s + ANSWER_GRACE_S
    while len(figures) < len(agents) and (left := deadline - time.monotonic()) > 0:
        msg = await client.next_message(min(left, 1.0))
        if msg is None:
            continue
        try:
            reply = codec.decode(msg.payload, CommandResult)
        except EdgesliceError:
            continue
        if reply.request_id not in asked or asked[reply.request_id] in figures:
            continue
        agent = asked[reply.request_id]
        if not reply.ok:
            figures[agent] = {"error": reply.error}
            echo(f"  {agent}: sweep failed: {reply.error}")
            continue
        r = reply.result
        figures[agent] = {
            k: r.get(k)
            for k in (
                "gflops",
                "memory_budget_bytes",
                "profile",
                "profile_gflops",
                "paced",
                "elapsed_s",
                "layers",
            )
        }
        done = [
            (int(i), agent, float(s)) for i, s in r.get("samples", []) if 0 <= int(i) < len(layers)
        ]
        figures[agent]["timed"] = len(done)
        measured += [m for m in done if m[2] > 0]
        echo(
            f"  {agent}: {len(done)}/{len(layers)} layers in {float(r.get('elapsed_s', 0)):.1f} s "
            f"({r.get('profile')}, {float(r.get('gflops', 0)):.2f} GFLOP/s"
            f"{', paced' if r.get('paced') else ''})"
        )
    for agent in agents:
        if agent not in figures:
            figures[agent] = {"error": "no answer before the deadline"}
            echo(f"  {agent}: no answer within {budget_s + ANSWER_GRACE_S:.0f} s")
    return figures, measured


def load_pricing(
    path: str | Path, profile: Any, inputs: tuple[Any, ...], refit_interval_s: float = 60.0
) -> Any:
    """The planner's :class:`~planner.learnedcost.LearnedPricing` from a calibration file,
    or None when scikit-learn is missing (the analytic model stays; logged). Blocking: it
    retrains the trees, re-runs the holdout (timing the sweep's layers here first when the
    file has no host timing: the baseline is always the planner's own timed pricing) and
    times the model's nodes."""
    from edgeslice.planner import learned
    from edgeslice.planner.learnedcost import LearnedPricing
    from edgeslice.planner.timing import node_seconds

    cal = load(path)
    if not learned.available():
        log.warning(
            "planner keeps the analytic cost model: %s needs scikit-learn "
            "(pip install 'edgeslice[ml]')",
            path,
        )
        return None
    if any(x.host_s is None for x in cal.layers):  # calibrated --no-host-timing: time here
        cal.layers, cal.reference_gflops = time_on_host(cal.layers)
    samples = cal.samples()
    result = learned.holdout(samples, cal.reference_gflops)
    choice = learned.choose(result)
    for layer_kind, why in sorted(choice.reasons.items()):
        log.info("cost model for %s layers: %s", layer_kind, why)
    pricing = LearnedPricing(
        samples, choice, profile, node_seconds(profile, inputs), _reference(), refit_interval_s
    )
    log.info(
        "planner loaded %s: %d samples from %d agent(s); learned model for %s",
        path,
        len(samples),
        len({s.agent for s in samples}),
        ", ".join(sorted(choice.learned))
        or f"no kind (the {choice.baseline} model is better; no serving refits)",
    )
    return pricing


def _reference() -> float:
    from edgeslice.broker.calibration import measure_gflops

    return measure_gflops(0.5, threads=1)
