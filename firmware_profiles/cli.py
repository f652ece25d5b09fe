"""Owns ``edgeslice profiles``: list, show and validate firmware profiles from the command line.

This module must stay free of torch (it runs on a fresh device before anything
heavy is installed, and ``edgeslice profiles list`` should answer instantly);
it only reads TOML through :mod:`firmware_profiles.schema`. Every
:class:`~broker.protocol.errors.ProfileError` becomes a one-paragraph message
on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence

import click
from click.shell_completion import CompletionItem

from edgeslice.broker.protocol.errors import ProfileError
from edgeslice.firmware_profiles.schema import (
    FirmwareProfile,
    LinkProfile,
    list_profiles,
    load_profile,
    profile_names,
    profile_to_dict,
    validate_file,
)

JSON_HELP = "Print JSON instead of a table (one object per line for 'list')."


def format_ram(mb: int) -> str:
    """``4096`` -> ``4 GiB``, ``3584`` -> ``3.5 GiB``; below 1 GiB in MiB (``624 MiB``)."""
    return f"{round(mb / 1024, 1):g} GiB" if mb >= 1024 else f"{mb} MiB"


def format_link(link: LinkProfile) -> str:
    """``ethernet 940 Mbit/s 0.2 ms``, with the loss appended only when there is some."""
    text = f"{link.kind} {link.bandwidth_mbit:g} Mbit/s {link.latency_ms:g} ms"
    return f"{text} {link.loss_pct:g}% loss" if link.loss_pct else text


def format_table(profiles: Sequence[FirmwareProfile]) -> str:
    """A plain aligned table, one profile per row (what ``profiles list`` prints)."""
    header = ("NAME", "ARCH", "CORES", "CLOCK", "RAM", "BUDGET", "GFLOP/S", "LINK")
    rows = [header] + [
        (
            p.name,
            p.arch,
            str(p.cores),
            f"{p.clock_mhz} MHz",
            format_ram(p.ram_mb),
            format_ram(p.memory_budget_mb),
            f"{p.gflops_fp32:g}",
            format_link(p.link),
        )
        for p in profiles
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    right = {2, 6}  # numeric columns read better right-aligned
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=False))
        ]
        lines.append("  ".join([*cells, row[-1]]))
    return "\n".join(lines)


def format_profile(profile: FirmwareProfile) -> str:
    """Every field of one profile, labelled with the TOML field names and units."""
    wrap_at = 100 - 22
    rows: list[tuple[str, str]] = [
        ("name", profile.name),
        ("description", profile.description),
        ("arch", profile.arch),
        ("cpu", profile.cpu),
        ("cores", str(profile.cores)),
        ("clock_mhz", f"{profile.clock_mhz} MHz"),
        ("ram_mb", f"{profile.ram_mb} MiB ({format_ram(profile.ram_mb)})"),
        ("memory_reserved_mb", f"{profile.memory_reserved_mb} MiB (OS + agent)"),
        ("memory budget", f"{profile.memory_budget_mb} MiB for model stages"),
        ("gflops_fp32", f"{profile.gflops_fp32:g} GFLOP/s"),
        ("gflops_source", profile.gflops_source),
        ("thermal_limit_c", f"{profile.thermal_limit_c:g} °C"),
        ("link.kind", profile.link.kind),
        ("link.bandwidth_mbit", f"{profile.link.bandwidth_mbit:g} Mbit/s"),
        ("link.latency_ms", f"{profile.link.latency_ms:g} ms (one way)"),
        ("link.loss_pct", f"{profile.link.loss_pct:g} %"),
    ]
    lines = []
    for label, value in rows:
        wrapped = textwrap.wrap(value, wrap_at) or [""]
        lines.append(f"{label:<20}  {wrapped[0]}")
        lines.extend(f"{'':<20}  {more}" for more in wrapped[1:])
    return "\n".join(lines)


def _complete_names(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    return [CompletionItem(name) for name in profile_names() if name.startswith(incomplete)]


@click.group("profiles")
def profiles_group() -> None:
    """List, show and validate firmware profiles (device classes).

    A firmware profile describes a class of device as data: cores, clock, RAM,
    the fp32 GFLOP/s torch reaches on it, its throttle temperature, the memory
    kept for the OS and agent, and its typical network link. Agents announce
    their profile (`edgeslice agent --profile rpi4-4gb`); the planner plans
    with it until calibration has measured the real device; the testbed
    emulates it.

    For a board that is not shipped, copy a similar profile to NAME.toml, edit
    it, check it with `edgeslice profiles validate NAME.toml`, and pass the
    path wherever a profile name is accepted.
    """


@profiles_group.command("list")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def list_cmd(as_json: bool) -> None:
    """List the shipped profiles: name, cores, clock, RAM, budget, GFLOP/s, link.

    BUDGET is the RAM the planner may fill with model stages (RAM minus the
    reserve for the OS and agent).
    """
    try:
        profiles = list_profiles()
    except ProfileError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        for profile in profiles:
            click.echo(json.dumps(profile_to_dict(profile)))
    else:
        click.echo(format_table(profiles))


@profiles_group.command("show")
@click.argument("name_or_path", shell_complete=_complete_names)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def show_cmd(name_or_path: str, as_json: bool) -> None:
    """Show every field of one profile.

    NAME_OR_PATH is a shipped profile name (see `edgeslice profiles list`) or
    the path of a .toml file (anything containing '/' or ending in .toml).
    """
    try:
        profile = load_profile(name_or_path)
    except ProfileError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(profile_to_dict(profile), indent=2))
    else:
        click.echo(format_profile(profile))


@profiles_group.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=str))
def validate_cmd(files: tuple[str, ...]) -> None:
    """Check profile files; print 'ok' per good file, exit 1 if any file is invalid.

    Every problem in every file is reported (missing or unknown fields, wrong
    types, out-of-range values, a name that differs from the file name).
    """
    errors: list[str] = []
    for path in files:
        try:
            profile = validate_file(path)
        except ProfileError as exc:
            errors.append(str(exc))
            continue
        click.echo(f"ok  {path}  ({profile.name})")
    if errors:
        summary = (
            [f"{len(errors)} of {len(files)} profile files are invalid:"] if len(files) > 1 else []
        )
        raise click.ClickException("\n".join([*summary, *errors]))


@profiles_group.command("detect")
@click.option(
    "--root",
    type=click.Path(file_okay=False, exists=True),
    default="/",
    show_default=True,
    help="Read proc/device-tree/model, proc/cpuinfo and proc/meminfo under this directory "
    "(another board's files copied here, to check what it would get).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def detect_cmd(root: str, as_json: bool) -> None:
    """Print the profile `edgeslice agent --profile auto` would choose here, and why.

    Raspberry Pi and Jetson boards are recognised by their device-tree model and
    sized by their RAM; an x86-64 machine is the x86-laptop class. A board with no
    exact profile gets the nearest one (architecture, cores, RAM) and a warning.
    """
    from edgeslice.firmware_profiles.detect import detect

    try:
        found = detect(root)
    except ProfileError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        facts = found.facts
        click.echo(
            json.dumps(
                {
                    "profile": found.profile,
                    "exact": found.exact,
                    "reason": found.reason,
                    "detected": {
                        "model": facts.model,
                        "arch": facts.arch,
                        "cores": facts.cores,
                        "ram_mb": facts.ram_mb,
                        "cpu": facts.cpu,
                    },
                }
            )
        )
        return
    click.echo(f"detected  {found.facts.describe()}")
    click.echo(f"profile   {found.profile}")
    click.echo(f"why       {found.reason}" + ("" if found.exact else " (no exact match)"))
    if found.warning:
        click.echo(f"WARNING: {found.warning}", err=True)
