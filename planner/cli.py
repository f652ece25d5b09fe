"""``edgeslice planner|infer|profile|keygen|demo|bench``: the planner side's commands.

Heavy imports (torch, the planner service) happen inside each command, so the lazy CLI
group can list and describe these commands without loading torch.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
from pathlib import Path

import click

from broker.lifecycle import run_until_signalled
from broker.protocol.errors import EdgesliceError
from broker.settings import BrokerSettings, connection_options

MODEL_HELP = (
    "Built-in model (mobilenetv2, resnet18, transformer) or path/file.py:callable or "
    "package.module:callable returning an nn.Module or (module, example_input)."
)


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


@click.command(name="planner")
@connection_options
@click.option("--model", "model_spec", required=True, envvar="EDGESLICE_MODEL", help=MODEL_HELP)
@click.option(
    "--objective",
    type=click.Choice(["latency", "throughput"]),
    default="throughput",
    show_default=True,
    help="Minimise one request's latency, or the slowest stage.",
)
@click.option(
    "--min-agents",
    type=int,
    default=1,
    show_default=True,
    help="Wait for this many agents before the first plan.",
)
@click.option(
    "--max-segments",
    type=int,
    default=48,
    show_default=True,
    help="Merge the model's cut points down to this many segments (DP size).",
)
@click.option("--max-stages", type=int, default=None, help="At most this many pipeline stages.")
@click.option(
    "--compression",
    type=click.Choice(["none", "fp16", "int8"]),
    default="none",
    show_default=True,
    help="Activation compression between stages.",
)
@click.option(
    "--fleet-key-file",
    envvar="EDGESLICE_FLEET_KEY_FILE",
    default=None,
    help="Key that signs stage artifacts (default ~/.config/edgeslice/fleet.key).",
)
@click.option(
    "--replan-delay",
    type=float,
    default=2.0,
    show_default=True,
    help="Seconds of quiet after agents join/leave before re-planning.",
)
@click.option(
    "--strategy",
    type=click.Choice(["edgeslice", "monolithic", "even-split", "memory-proportional", "amp4ec"]),
    default="edgeslice",
    show_default=True,
    help="Partitioner: edgeslice's DP, or a baseline (for side-by-side benchmarks).",
)
def planner_cmd(
    settings: BrokerSettings,
    model_spec: str,
    objective: str,
    min_agents: int,
    max_segments: int,
    max_stages: int | None,
    compression: str,
    fleet_key_file: str | None,
    replan_delay: float,
    strategy: str,
) -> None:
    """Run the planner for one model until SIGTERM/Ctrl-C.

    It profiles the model, waits for agents, places contiguous slices on them
    (a DP over cut points and agents, with replicas on spare agents), signs and
    serves the stage artifacts, and re-plans when agents join or leave.
    """
    from planner.service import PlannerConfig, PlannerService

    try:
        service = PlannerService(
            PlannerConfig(
                model_spec=model_spec,
                broker=settings,
                objective=objective,
                min_agents=min_agents,
                max_segments=max_segments,
                max_stages=max_stages,
                fleet_key_file=fleet_key_file,
                replan_delay_s=replan_delay,
                strategy=strategy,
                compression=None if compression == "none" else compression,
            )
        )
        click.echo(f"edgeslice planner: model {model_spec} -> {settings.url}", err=True)
        asyncio.run(run_until_signalled(service.run))
    except EdgesliceError as exc:
        raise _fail(exc) from None


@click.command(name="infer")
@connection_options
@click.option("--model", required=True, help="Model name as the planner publishes it.")
@click.option(
    "--input",
    "input_file",
    type=click.Path(exists=True, dir_okay=False),
    help="A tensor file (torch.save of a tensor or tuple of tensors, weights_only).",
)
@click.option("--random", "use_random", is_flag=True, help="Random inputs of the plan's shapes.")
@click.option("--count", type=int, default=1, show_default=True, help="How many requests.")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds per request.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per request.")
def infer_cmd(
    settings: BrokerSettings,
    model: str,
    input_file: str | None,
    use_random: bool,
    count: int,
    timeout: float,
    as_json: bool,
) -> None:
    """Send inference requests to a running fleet and print results and timings."""
    if (input_file is None) == (not use_random):
        raise click.UsageError("give exactly one of --input FILE or --random")
    try:
        asyncio.run(_infer(settings, model, input_file, count, timeout, as_json))
    except EdgesliceError as exc:
        raise _fail(exc) from None


async def _infer(
    settings: BrokerSettings,
    model: str,
    input_file: str | None,
    count: int,
    timeout: float,
    as_json: bool,
) -> None:
    import torch

    from planner.client import InferenceClient

    async with InferenceClient(settings, model) as client:
        plan = await client.wait_ready(timeout)
        if input_file:
            loaded = torch.load(input_file, weights_only=True)
            inputs = list(loaded) if isinstance(loaded, tuple | list) else [loaded]
        else:
            inputs = [_random_like(spec) for spec in plan.input_specs]
        for _ in range(count):
            res = await client.infer(inputs, timeout=timeout)
            summary = {
                "request": res.request_id,
                "latency_ms": round(res.latency_s * 1e3, 2),
                "route": res.route,
                "plan_version": res.plan_version,
                "outputs": [{"shape": list(o.shape), "dtype": str(o.dtype)} for o in res.outputs],
                "stages": [
                    {k: (round(v * 1e3, 2) if k.endswith("_s") else v) for k, v in t.items()}
                    for t in res.timings
                ],
            }
            if as_json:
                click.echo(json.dumps(summary))
            else:
                top = res.outputs[0].flatten()
                click.echo(
                    f"{res.request_id[:8]}  {summary['latency_ms']:.1f} ms  via "
                    f"{' -> '.join(res.route)}  output {list(res.outputs[0].shape)} "
                    f"argmax {int(top.argmax())}"
                )


def _random_like(spec: dict[str, object]) -> object:
    import torch

    shape = [int(x) for x in spec["shape"]]  # type: ignore[attr-defined]
    dtype = getattr(torch, str(spec["dtype"]))
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype)
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    return torch.randint(0, 100, shape, dtype=dtype)


@click.command(name="profile")
@click.option("--model", "model_spec", required=True, help=MODEL_HELP)
@click.option("--max-segments", type=int, default=None, help="Merge cut points down to this many.")
def profile_cmd(model_spec: str, max_segments: int | None) -> None:
    """Print the model's cut points with FLOPs, parameter and activation bytes per segment."""
    from planner.modelspec import load_model
    from planner.profile import format_profile, profile_model

    try:
        loaded = load_model(model_spec)
        profile = profile_model(loaded.module, loaded.example_inputs, max_segments, loaded.name)
    except EdgesliceError as exc:
        raise _fail(exc) from None
    click.echo(format_profile(profile))


@click.command(name="keygen")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Key file (default ~/.config/edgeslice/fleet.key).",
)
@click.option("--force", is_flag=True, help="Replace an existing key (cached artifacts go stale).")
def keygen_cmd(out: str | None, force: bool) -> None:
    """Create the fleet key that signs stage artifacts; copy it to every device."""
    from broker.fleetkey import default_key_path, key_fingerprint, write_key

    try:
        key = write_key(out, force=force)
    except EdgesliceError as exc:
        raise _fail(exc) from None
    click.echo(
        f"wrote {out or default_key_path()} (fingerprint {key_fingerprint(key)}); copy it "
        "to every agent (or set EDGESLICE_FLEET_KEY_FILE)"
    )


@click.command(name="demo")
@click.option("--model", default="mobilenetv2", show_default=True, help=MODEL_HELP)
@click.option("--agents", type=int, default=3, show_default=True, help="Local agents to start.")
@click.option("--requests", type=int, default=32, show_default=True, help="Requests to run.")
@click.option(
    "--concurrency",
    type=int,
    default=4,
    show_default=True,
    help="Requests in flight at once for the throughput figure.",
)
@click.option(
    "--objective",
    type=click.Choice(["latency", "throughput"]),
    default="throughput",
    show_default=True,
)
@click.option(
    "--broker",
    "broker_url",
    default=None,
    help="Use this broker instead of starting one (mqtt://host:port).",
)
def demo_cmd(
    model: str, agents: int, requests: int, concurrency: int, objective: str, broker_url: str | None
) -> None:
    """Broker + planner + agents + a partitioned model on this machine, in one command.

    Starts everything as separate processes, runs REQUESTS through the
    partitioned model, checks each output against the whole model
    (torch.allclose), prints the plan and the measured figures, stops everything.
    """
    from planner.demo import DemoOptions, run_demo

    if agents < 1 or requests < 1 or concurrency < 1:
        raise click.UsageError("--agents, --requests and --concurrency must be >= 1")
    code = run_demo(
        DemoOptions(
            model=model,
            agents=agents,
            requests=requests,
            concurrency=concurrency,
            objective=objective,
            broker_url=broker_url,
        )
    )
    sys.exit(code)


BENCHMARKS = {
    "transport": "benchmarks.transport",
    "planner": "benchmarks.planner_bench",
    "strategies": "benchmarks.strategies",
    "scaling": "benchmarks.scaling",
    "simulation": "benchmarks.simulation",
}


@click.command(name="bench")
@click.argument("name", type=click.Choice(sorted(BENCHMARKS)))
@click.option(
    "--quick", is_flag=True, help="A short run (what CI runs to keep benchmarks working)."
)
def bench_cmd(name: str, quick: bool) -> None:
    """Run benchmark NAME; it prints its figures and writes benchmarks/results/NAME.json."""
    root = _source_root()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    module = importlib.import_module(BENCHMARKS[name])
    module.main(quick=quick)


def _source_root() -> Path:
    for candidate in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (candidate / "benchmarks" / "__init__.py").exists():
            return candidate
    raise click.ClickException(
        "benchmarks ship with the source tree, not the wheel: run `edgeslice bench` from a "
        "git clone of edgeslice"
    )


def _default_state() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "edgeslice", "testbed", "state.json")


@click.group(name="testbed")
def testbed_group() -> None:
    """Start and stop emulated device fleets (cgroup-limited agents behind shaped links)."""


@testbed_group.command(name="up")
@click.option(
    "--fleet",
    "fleet_file",
    required=True,
    type=click.Path(dir_okay=False),
    help="TOML fleet file: [[agents]] tables with profile, count, link, emulate.",
)
@click.option(
    "--state",
    "state_file",
    default=_default_state,
    show_default="~/.cache/...",
    help="Where to record the processes, for `testbed down`.",
)
@click.option(
    "--timeout",
    type=float,
    default=120.0,
    show_default=True,
    help="Seconds to wait for every agent to announce itself.",
)
def testbed_up(fleet_file: str, state_file: str, timeout: float) -> None:
    """Start a fleet in the background and print each agent's emulated rate and limits."""
    from planner.testbed import Testbed, load_fleet_file, wait_for_agents

    if os.path.exists(state_file):
        raise click.ClickException(
            f"a testbed is already up ({state_file}); run `edgeslice testbed down` first"
        )
    try:
        spec = load_fleet_file(fleet_file)
        workdir = os.path.join(os.path.dirname(state_file), "run")
        bed = Testbed(spec, workdir).up()
        Path(state_file).parent.mkdir(parents=True, exist_ok=True)
        Path(state_file).write_text(json.dumps(bed.state(), indent=2), encoding="utf-8")
        infos = asyncio.run(wait_for_agents(bed.broker_url, spec.namespace, bed.agents, timeout))
    except EdgesliceError as exc:
        raise _fail(exc) from None
    click.echo(
        f"testbed up: broker {bed.broker_url}, namespace {spec.namespace}, logs in {workdir}"
    )
    for agent_id, info in infos.items():
        mode = info.limits.get("mode", "unlimited") if info.limits else "unlimited"
        click.echo(f"  {agent_id:<20} {info.profile:<17} {info.gflops:7.2f} GFLOP/s  {mode}")
    click.echo(f"stop it with: edgeslice testbed down --state {state_file}")


@testbed_group.command(name="down")
@click.option(
    "--state",
    "state_file",
    default=_default_state,
    show_default="~/.cache/...",
    help="The state file `testbed up` wrote.",
)
def testbed_down(state_file: str) -> None:
    """Stop every testbed process and remove the agents' cgroups."""
    from planner.testbed import down_from_state

    try:
        left = down_from_state(state_file)
    except EdgesliceError as exc:
        raise _fail(exc) from None
    if left:
        raise click.ClickException("left behind: " + ", ".join(left))
    click.echo("testbed down: no process or cgroup left")
