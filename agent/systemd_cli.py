"""``edgeslice agent-service install``: run this device's agent as a systemd service.

A separate top-level command rather than an ``agent`` subcommand: ``edgeslice agent`` is
a plain command whose options take everything after it, and turning it into a group
would change how ``edgeslice agent --broker ...`` parses. The text of both files comes
from agent/systemd.py (pure); this module picks the executable, asks for nothing it
was not given, and writes (or, with ``--dry-run``, prints) the files.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import click

from edgeslice.agent import systemd
from edgeslice.broker.protocol.errors import ConfigError
from edgeslice.broker.settings import parse_broker_url


def find_executable() -> str | None:
    """The absolute path of the ``edgeslice`` script running now, else this Python's, else
    the first on PATH (the unit must start the same installation that wrote it)."""
    candidates = [Path(sys.argv[0]) if sys.argv else None]
    candidates.append(Path(sys.executable).parent / "edgeslice")
    found = shutil.which("edgeslice")
    candidates.append(Path(found) if found else None)
    for path in candidates:
        if path is not None and path.name == "edgeslice" and path.is_file():
            return os.path.abspath(path)
    return None


@click.group("agent-service")
def agent_service_group() -> None:
    """Run `edgeslice agent` as a systemd service on this device.

    `install` writes the unit and its environment file; the agent then starts at
    boot, restarts after a failure and logs to the journal
    (`journalctl -u edgeslice-agent`).
    """


@agent_service_group.command("install")
@click.option(
    "--broker",
    envvar="EDGESLICE_BROKER",
    required=True,
    help="Broker URL the agent connects to (mqtt:// or mqtts://). [env EDGESLICE_BROKER]",
)
@click.option("--id", "agent_id", envvar="EDGESLICE_ID", help="Agent id (default: host name).")
@click.option(
    "--profile",
    envvar="EDGESLICE_PROFILE",
    default="auto",
    show_default=True,
    help="Firmware profile name, .toml path, or 'auto' (detected at every start).",
)
@click.option("--namespace", envvar="EDGESLICE_NAMESPACE", help="Topic namespace.")
@click.option("--username", envvar="EDGESLICE_USERNAME", help="Broker user.")
@click.option(
    "--password",
    envvar="EDGESLICE_PASSWORD",
    help="Broker password, written only to the 0600 env file (prefer the env var or "
    "--ask-password to a flag in the shell history). [env EDGESLICE_PASSWORD]",
)
@click.option("--ask-password", is_flag=True, help="Prompt for the broker password.")
@click.option("--tls-ca", envvar="EDGESLICE_TLS_CA", help="CA certificate file for mqtts://.")
@click.option(
    "--fleet-key-file",
    default=systemd.FLEET_KEY_FILE,
    show_default=True,
    help="Where the agent finds the planner's public key (fleet.pub).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Serve Prometheus /metrics on this port (needs the 'metrics' extra).",
)
@click.option("--metrics-host", default=None, help="Address /metrics binds (default 127.0.0.1).")
@click.option(
    "--drain-timeout",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="The agent's --drain-timeout; the unit's stop timeout leaves room for it.",
)
@click.option(
    "--user",
    default=systemd.SERVICE_USER,
    show_default=True,
    help="System user the agent runs as.",
)
@click.option(
    "--executable",
    type=click.Path(dir_okay=False),
    default=None,
    help="The edgeslice executable ExecStart runs (default: the one running now).",
)
@click.option(
    "--prefix",
    type=click.Path(file_okay=False),
    default="/",
    show_default=True,
    help="Write the files under this directory instead of / (packaging, tests).",
)
@click.option("--dry-run", is_flag=True, help="Print the files instead of writing them.")
def install_cmd(
    broker: str,
    agent_id: str | None,
    profile: str,
    namespace: str | None,
    username: str | None,
    password: str | None,
    ask_password: bool,
    tls_ca: str | None,
    fleet_key_file: str,
    metrics_port: int | None,
    metrics_host: str | None,
    drain_timeout: float,
    user: str,
    executable: str | None,
    prefix: str,
    dry_run: bool,
) -> None:
    """Write /etc/systemd/system/edgeslice-agent.service and /etc/edgeslice/agent.env.

    The settings go to the env file as EDGESLICE_* variables (the password only
    there, mode 0600); the unit runs `edgeslice agent` as the `edgeslice` user
    with Restart=on-failure, journald logging and a hardened sandbox (no
    --emulate: it needs root). Then it prints how to create the user and enable
    the service. Example:

    \b
        sudo edgeslice agent-service install --broker mqtts://192.168.1.10 \\
            --id pi-1 --username pi-1 --ask-password
    """
    try:
        parse_broker_url(broker)  # a typo fails here, not at every restart
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--broker") from None
    exe = os.path.abspath(executable) if executable else find_executable()
    if exe is None:
        raise click.ClickException(
            "cannot find the edgeslice executable; pass --executable /path/to/edgeslice"
        )
    if ask_password:
        password = click.prompt("broker password", hide_input=True, err=True)
    spec = systemd.ServiceSpec(
        executable=exe,
        broker=broker,
        agent_id=agent_id,
        profile=profile,
        namespace=namespace,
        username=username,
        password=password,
        tls_ca=tls_ca,
        fleet_key_file=fleet_key_file or None,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        user=user,
        drain_timeout_s=drain_timeout,
    )
    if dry_run:
        for file in systemd.service_files(systemd.masked(spec)):
            click.echo(f"# ---- {file.path} (mode {file.mode:04o})")
            click.echo(file.text)
        click.echo(systemd.next_steps(spec, written=False))
        return
    try:
        written = systemd.write_files(systemd.service_files(spec), prefix)
    except OSError as exc:
        raise click.ClickException(
            f"cannot write {exc.filename or 'the service files'}: {exc.strerror or exc}; run it "
            "as root (sudo), or use --dry-run / --prefix DIR"
        ) from None
    for path in written:
        click.echo(f"wrote {path}")
    click.echo(systemd.next_steps(spec))
