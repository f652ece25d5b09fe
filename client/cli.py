"""``edgeslice infer``: send requests to a running fleet and print results and timings.

torch and the client are imported inside the command, so the lazy CLI group can list
and describe it without loading torch.
"""

from __future__ import annotations

import asyncio
import json
import re
import warnings
from typing import Any

import click

from edgeslice.broker.modelname import model_name_for_spec
from edgeslice.broker.protocol.errors import ConfigError, EdgesliceError
from edgeslice.broker.settings import BrokerSettings, connection_options

_EXPECTED = "expected a tensor or a tuple/list of tensors saved with torch.save(obj, FILE)"
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


def load_input_file(path: str) -> list[Any]:
    """The request tensors saved in ``path``; a one-line :class:`ConfigError` otherwise.

    Loaded with ``weights_only=True``: a file holding anything but tensors and plain
    containers is refused by torch, never executed.
    """
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4"
            loaded = torch.load(path, weights_only=True, map_location="cpu")
    except OSError as exc:
        raise ConfigError(f"--input {path!r}: cannot read it ({exc.strerror})") from None
    except Exception as exc:
        found = _UNSUPPORTED_GLOBAL.search(str(exc))
        if found:
            what = f"a pickled {found.group(1)} object"
        else:
            what = "no torch.save data (text, random bytes or another format)"
        raise ConfigError(f"--input {path!r} holds {what}; {_EXPECTED}") from None
    items = list(loaded) if isinstance(loaded, tuple | list) else [loaded]
    if not items or not all(isinstance(t, torch.Tensor) for t in items):
        if isinstance(loaded, tuple | list):
            kinds = sorted({type(t).__name__ for t in items}) or ["nothing"]
            what = f"a {type(loaded).__name__} of {', '.join(kinds)}"
        elif isinstance(loaded, dict):
            what = f"a dict (keys {', '.join(map(str, list(loaded)[:4]))})"
        else:
            what = f"a {type(loaded).__name__}"
        raise ConfigError(f"--input {path!r} holds {what}; {_EXPECTED}")
    return items


def stage_timings_ms(timing: dict[str, Any]) -> dict[str, Any]:
    """One stage's timings with every ``*_s`` seconds value as ``*_ms`` milliseconds."""
    return {
        (f"{k[:-2]}_ms" if k.endswith("_s") else k): (
            round(v * 1e3, 2) if k.endswith("_s") and isinstance(v, int | float) else v
        )
        for k, v in timing.items()
    }


@click.command(name="infer")
@connection_options
@click.option(
    "--model",
    required=True,
    help="The model's name as the planner prints it, or the --model spec given to the planner.",
)
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
        # checked before any connection: a wrong file must not wait for a broker
        inputs = load_input_file(input_file) if input_file else None
        asyncio.run(_infer(settings, model_name_for_spec(model), inputs, count, timeout, as_json))
    except EdgesliceError as exc:
        raise _fail(exc) from None


async def _infer(
    settings: BrokerSettings,
    model: str,
    given: list[Any] | None,
    count: int,
    timeout: float,
    as_json: bool,
) -> None:
    from edgeslice.client.inference import InferenceClient

    async with InferenceClient(settings, model) as client:
        plan = await client.wait_ready(timeout)
        inputs = given if given is not None else [_random_like(s) for s in plan.input_specs]
        for _ in range(count):
            res = await client.infer(inputs, timeout=timeout)
            summary = {
                "request": res.request_id,
                "latency_ms": round(res.latency_s * 1e3, 2),
                "route": res.route,
                "plan_version": res.plan_version,
                "outputs": [{"shape": list(o.shape), "dtype": str(o.dtype)} for o in res.outputs],
                "stages": [stage_timings_ms(t) for t in res.timings],
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


def _random_like(spec: dict[str, object]) -> Any:
    import torch

    shape = [int(x) for x in spec["shape"]]  # type: ignore[attr-defined]
    dtype = getattr(torch, str(spec["dtype"]))
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype)
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    return torch.randint(0, 100, shape, dtype=dtype)
