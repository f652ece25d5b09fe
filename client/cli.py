"""``edgeslice infer``: send requests to a running fleet and print results and timings.

torch and the client are imported inside the command, so the lazy CLI group can list
and describe it without loading torch.
"""

from __future__ import annotations

import asyncio
import json

import click

from edgeslice.broker.protocol.errors import EdgesliceError
from edgeslice.broker.settings import BrokerSettings, connection_options


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


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

    from edgeslice.client.inference import InferenceClient

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
