"""``edgeslice planner|profile|keygen``: the planner side's commands.

Heavy imports (torch, the planner service) happen inside each command, so the lazy CLI
group can list and describe these commands without loading torch.
"""

from __future__ import annotations

import asyncio

import click

from edgeslice.broker.lifecycle import run_until_signalled
from edgeslice.broker.metrics import MetricsEndpoint, metrics_options
from edgeslice.broker.protocol.errors import EdgesliceError
from edgeslice.broker.settings import BrokerSettings, connection_options

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
    "--max-latency-ms",
    type=float,
    default=None,
    help="Serve the highest-throughput plan whose predicted latency is within this many "
    "ms (a point of the Pareto front `edgeslice plan` prints, with the bound that selects "
    "it); the fastest plan, with a warning, when none is. Needs --objective throughput.",
)
@click.option(
    "--min-agents",
    type=int,
    default=1,
    show_default=True,
    help="Wait for this many agents before the first plan; afterwards the best plan on "
    "the agents left is always served (or withdrawn, saying why, when none is possible).",
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
    help="Private key that signs stage artifacts, made by `edgeslice keygen` "
    "(default ~/.config/edgeslice/fleet.key; agents get its fleet.pub).",
)
@click.option(
    "--replan-delay",
    type=float,
    default=2.0,
    show_default=True,
    help="Seconds of quiet after agents join before re-planning (a leave re-plans at once).",
)
@click.option(
    "--strategy",
    type=click.Choice(["edgeslice", "monolithic", "even-split", "memory-proportional", "amp4ec"]),
    default="edgeslice",
    show_default=True,
    help="Partitioner: edgeslice's DP, or a baseline (for side-by-side benchmarks).",
)
@click.option(
    "--intra-layer",
    type=click.Choice(["off", "dp", "auto", "outc", "inh", "inw", "grid", "fixed"]),
    default="off",
    show_default=True,
    envvar="EDGESLICE_INTRA_LAYER",
    help="Serve a tiled (intra-layer) plan, where a split block runs on all agents at "
    "once, each computing a box of its output. dp: per block, whole on one agent or split "
    "(fusing up to --max-fusion segments), whichever the latency DP prefers; auto: every "
    "segment that can be split is, by the split needing the fewest bytes per device; "
    "outc|inh|inw|grid: that split (output channels, input height, width, 2-D grid) for "
    "every segment it applies to, exchanging after each; fixed: input-height splits "
    "fused over blocks of one length (the best up to --max-fusion). Unsplit segments run "
    "whole.",
)
@click.option(
    "--max-fusion",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Tiled plans: at most this many segments in one split block (its tiles recompute "
    "the halo instead of exchanging after every segment).",
)
@click.option(
    "--cost-model",
    type=click.Path(exists=True, dir_okay=False),
    envvar="EDGESLICE_COST_MODEL",
    default=None,
    help="Calibration file from `edgeslice calibrate`: price the layer kinds on which the "
    "learned estimator beat the timed model on held-out layers with it, and keep "
    "training it on the stage timings agents report (needs the ml extra; without "
    "scikit-learn the planner warns and keeps the analytic model).",
)
@click.option(
    "--refit-interval",
    type=float,
    default=60.0,
    show_default=True,
    help="With --cost-model: retrain on serving stage timings at most this often (s).",
)
@click.option(
    "--clear-plan-on-exit/--keep-plan-on-exit",
    default=False,
    show_default=True,
    envvar="EDGESLICE_CLEAR_PLAN_ON_EXIT",
    help="On SIGTERM/Ctrl-C clear the retained plan (the fleet is retired), or keep it: "
    "agents serve on and a restarted planner adopts it if still valid.",
)
@metrics_options
@click.option(
    "--busy-high",
    type=float,
    default=0.8,
    show_default=True,
    help="Load shift: an agent whose stage worker is busy above this fraction ...",
)
@click.option(
    "--busy-hold",
    type=float,
    default=10.0,
    show_default=True,
    help="... for this many seconds, while the rest of the fleet is not, gets less work ...",
)
@click.option(
    "--busy-low",
    type=float,
    default=0.6,
    show_default=True,
    help="... until it has been busy below this fraction ...",
)
@click.option(
    "--busy-recover",
    type=float,
    default=30.0,
    show_default=True,
    help="... for this many seconds (longer than the hold: plans do not flap).",
)
def planner_cmd(
    settings: BrokerSettings,
    model_spec: str,
    objective: str,
    max_latency_ms: float | None,
    min_agents: int,
    max_segments: int,
    max_stages: int | None,
    compression: str,
    fleet_key_file: str | None,
    replan_delay: float,
    strategy: str,
    intra_layer: str,
    max_fusion: int,
    cost_model: str | None,
    refit_interval: float,
    clear_plan_on_exit: bool,
    metrics: MetricsEndpoint | None,
    busy_high: float,
    busy_hold: float,
    busy_low: float,
    busy_recover: float,
) -> None:
    """Run the planner for one model until SIGTERM/Ctrl-C.

    It profiles the model, waits for agents, places contiguous slices on them
    (a DP over cut points and agents, with replicas on spare agents), signs and
    serves the stage artifacts, and re-plans when agents join or leave.
    """
    from edgeslice.planner.config import PlannerConfig
    from edgeslice.planner.replan import LoadShiftConfig
    from edgeslice.planner.retained import describe_plan
    from edgeslice.planner.service import PlannerService

    try:
        service = PlannerService(
            PlannerConfig(
                model_spec=model_spec,
                broker=settings,
                objective=objective,
                max_latency_s=None if max_latency_ms is None else max_latency_ms / 1e3,
                min_agents=min_agents,
                max_segments=max_segments,
                max_stages=max_stages,
                fleet_key_file=fleet_key_file,
                replan_delay_s=replan_delay,
                strategy=strategy,
                intra_layer="" if intra_layer == "off" else intra_layer,
                max_fusion=max_fusion,
                cost_model=cost_model,
                refit_interval_s=refit_interval,
                clear_plan_on_exit=clear_plan_on_exit,
                compression=None if compression == "none" else compression,
                load_shift=LoadShiftConfig(
                    high=busy_high, low=busy_low, hold_s=busy_hold, recover_s=busy_recover
                ),
            ),
            # one line per plan on stderr, shown without -v (logging defaults to WARNING)
            on_plan=lambda plan: click.echo(f"edgeslice planner: {describe_plan(plan)}", err=True),
        )
        from edgeslice.broker.modelname import model_name_for_spec

        served = model_name_for_spec(model_spec)
        namespace = (
            "" if settings.namespace == "edgeslice" else f" --namespace {settings.namespace}"
        )
        click.echo(
            f"edgeslice planner: model {model_spec} served as {served!r} on {settings.url} "
            f"(namespace {settings.namespace})",
            err=True,
        )
        click.echo(
            f"edgeslice planner: send requests with: edgeslice infer --broker {settings.url}"
            f"{namespace} --model {served} --random",
            err=True,
        )
        if metrics is not None:
            from edgeslice.planner.metrics import serve_planner_metrics

            exporter = serve_planner_metrics(service, metrics)
            click.echo(f"edgeslice planner: metrics on {exporter.url}", err=True)
        asyncio.run(run_until_signalled(service.run))
    except EdgesliceError as exc:
        raise _fail(exc) from None


@click.command(name="profile")
@click.option("--model", "model_spec", required=True, help=MODEL_HELP)
@click.option("--max-segments", type=int, default=None, help="Merge cut points down to this many.")
def profile_cmd(model_spec: str, max_segments: int | None) -> None:
    """Print the model's cut points with FLOPs, parameter and activation bytes per segment."""
    from edgeslice.planner.modelspec import load_model
    from edgeslice.planner.profile import format_profile, profile_model

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
    help="Private key file (default ~/.config/edgeslice/fleet.key); the public key is "
    "written next to it as .pub.",
)
@click.option("--force", is_flag=True, help="Replace an existing key (cached artifacts go stale).")
@click.option(
    "--migrate",
    is_flag=True,
    help="Replace an old shared HMAC fleet key with a key pair (the old file is kept as "
    "<file>.hmac-old).",
)
def keygen_cmd(out: str | None, force: bool, migrate: bool) -> None:
    """Create the key pair that signs stage artifacts: fleet.key stays on the planner,
    fleet.pub goes to every agent."""
    from edgeslice.broker import fleetkey

    target = out or str(fleetkey.default_key_path())
    try:
        if migrate and force:
            raise EdgesliceError("use --migrate or --force, not both")
        if migrate:
            key, old = fleetkey.migrate_key(target)
            click.echo(f"moved the old shared HMAC key to {old} (delete it once migrated)")
        else:
            key = fleetkey.write_key(target, force=force)
    except EdgesliceError as exc:
        raise _fail(exc) from None
    public = fleetkey.public_path_for(target)
    click.echo(f"private key: {target} (mode 0600): keep it on the planner machine only")
    click.echo(f"public key:  {public} (fingerprint {fleetkey.key_fingerprint(key)})")
    click.echo(
        f"copy {public.name} to every agent as ~/.config/edgeslice/fleet.pub (or point "
        "--fleet-key-file / EDGESLICE_FLEET_KEY_FILE at it, or set "
        f"EDGESLICE_FLEET_KEY={fleetkey.public_key_line(key)})"
    )
    if migrate:
        click.echo(
            "then restart the planner and the agents, and delete the old fleet.key from "
            "every agent: agents no longer need any secret"
        )
