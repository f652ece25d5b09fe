"""Owns ``edgeslice broker``: run a development broker in the foreground, or write a prod config.

``edgeslice broker`` starts :class:`lab.server.LocalBroker` (mosquitto if installed,
else amqtt; ``--kind rabbitmq`` or ``--kind nats`` for those, each with its own data
dirs in a temp dir, never the machine's services), prints its URL and waits; Ctrl-C or
SIGTERM stops the broker and exits 0. A port that is already taken is a runtime failure
(exit 1) with a hint, not a traceback. ``edgeslice broker config --out DIR`` writes the
files of :mod:`lab.mosquitto_conf` for a TLS + password + ACL mosquitto into a new or
empty folder (``--force`` to write over what is there).
"""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import cast

import click

from edgeslice.broker.protocol.errors import BrokerError, ConfigError
from edgeslice.broker.settings import DEFAULT_NAMESPACE
from edgeslice.lab.mosquitto_conf import MosquittoSetup, render_all, split_names
from edgeslice.lab.server import KINDS, BrokerKind, LocalBroker, port_in_use


class _Terminated(Exception):
    """Raised from the SIGTERM handler so that SIGTERM ends the wait like Ctrl-C does."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated()


@click.group(
    "broker",
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option(
    "--host",
    envvar="EDGESLICE_BROKER_HOST",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; 0.0.0.0 exposes the (password-less) broker to your network. "
    "[env EDGESLICE_BROKER_HOST]",
)
@click.option(
    "--port",
    envvar="EDGESLICE_BROKER_PORT",
    type=click.IntRange(0, 65535),
    default=1883,
    show_default=True,
    help="TCP port; 0 picks a free one (printed). [env EDGESLICE_BROKER_PORT]",
)
@click.option(
    "--kind",
    envvar="EDGESLICE_BROKER_KIND",
    type=click.Choice(["auto", *KINDS]),
    default="auto",
    show_default=True,
    help="Which broker: auto = mosquitto if installed, else amqtt; rabbitmq (a node of its "
    "own with the MQTT plugin) or nats (JetStream + MQTT) to try the clustered ones. "
    "[env EDGESLICE_BROKER_KIND]",
)
@click.option(
    "--log-file",
    envvar="EDGESLICE_BROKER_LOG",
    type=click.Path(dir_okay=False),
    default=None,
    help="Keep the broker's own log in this file (appended). [env EDGESLICE_BROKER_LOG]",
)
@click.pass_context
def broker_group(ctx: click.Context, host: str, port: int, kind: str, log_file: str | None) -> None:
    """Run a local development broker (anonymous, no TLS) until Ctrl-C.

    For production, `edgeslice broker config --out DIR` writes a mosquitto
    set-up with TLS, one password per device and an ACL.
    """
    if ctx.invoked_subcommand is not None:
        return
    run_foreground(host, port, kind, log_file)


def run_foreground(host: str, port: int, kind: str, log_file: str | None) -> None:
    """Start the broker, print its URL, block until Ctrl-C/SIGTERM, stop it; exit 1 on failure."""
    try:
        if port and port_in_use(host, port):
            raise click.ClickException(
                f"port {port} on {host} is already in use (another broker running?); "
                "stop it, choose another with --port, or use --port 0 for a free one"
            )
        broker = LocalBroker(host, port, cast(BrokerKind, kind), log_path=log_file)
        broker.start()
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"edgeslice broker: {broker.kind} listening on {broker.url} "
        f"(pid {broker.pid}; Ctrl-C to stop)"
    )
    previous_term = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        code = broker.wait()
        tail = broker.log_tail()
        raise click.ClickException(
            f"{broker.kind} on {broker.url} exited by itself with code {code}\n{tail}"
        )
    except (KeyboardInterrupt, _Terminated):
        pass
    finally:
        # A second Ctrl-C must not abandon a half-stopped broker.
        previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        broker.stop()
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous_term)
    click.echo("edgeslice broker: stopped")


def _refuse_non_empty(out_dir: str, force: bool) -> None:
    """Exit 1 if ``out_dir`` holds anything and ``--force`` was not given."""
    try:
        present = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    except OSError as exc:
        raise click.ClickException(f"cannot read --out {out_dir!r}: {exc.strerror}") from None
    if present and not force:
        more = f" and {len(present) - 5} more" if len(present) > 5 else ""
        shown = ", ".join(present[:5]) + more
        raise click.ClickException(
            f"--out {out_dir!r} is not empty (it holds {shown}); use --force to write over "
            "it, or choose another folder"
        )


@broker_group.command("config")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory to write mosquitto.conf, acl and README-broker.md into (created; "
    "must be empty unless --force).",
)
@click.option(
    "--namespace",
    envvar="EDGESLICE_NAMESPACE",
    default=DEFAULT_NAMESPACE,
    show_default=True,
    help="Topic namespace of the fleet. [env EDGESLICE_NAMESPACE]",
)
@click.option(
    "--hostname",
    default="broker.local",
    show_default=True,
    help="Name devices use to reach the broker (goes into the server certificate).",
)
@click.option("--port", type=click.IntRange(1, 65535), default=8883, show_default=True)
@click.option("--bind", default=None, help="Address of the main listener [default: all].")
@click.option("--no-tls", is_flag=True, help="Plain MQTT main listener (tests, trusted LANs only).")
@click.option(
    "--local-port",
    type=click.IntRange(0, 65535),
    default=1883,
    show_default=True,
    help="Extra plain listener on 127.0.0.1 for services on the broker host; 0 = none.",
)
@click.option(
    "--agents",
    multiple=True,
    help="Agent ids = their usernames, comma-separated or repeated: --agents pi-1,pi-2.",
)
@click.option(
    "--clients",
    multiple=True,
    default=("client",),
    show_default=True,
    help="Client accounts allowed to send inference requests (comma-separated or repeated).",
)
@click.option("--planner-user", default="planner", show_default=True)
@click.option("--monitor-user", default="monitor", show_default=True)
@click.option(
    "--install-dir",
    default="/etc/mosquitto/edgeslice",
    show_default=True,
    help="Where these files, passwd and certs/ will live on the broker host.",
)
@click.option("--data-dir", default="/var/lib/mosquitto/", show_default=True)
@click.option("--no-persistence", is_flag=True, help="Keep nothing across broker restarts.")
@click.option("--max-packet-mib", type=click.IntRange(1, 256), default=64, show_default=True)
@click.option("--require-client-cert", is_flag=True, help="Devices also need a certificate.")
@click.option("--force", is_flag=True, help="Write into --out even if it is not empty.")
def config_cmd(
    out_dir: str,
    namespace: str,
    hostname: str,
    port: int,
    bind: str | None,
    no_tls: bool,
    local_port: int,
    agents: tuple[str, ...],
    clients: tuple[str, ...],
    planner_user: str,
    monitor_user: str,
    install_dir: str,
    data_dir: str,
    no_persistence: bool,
    max_packet_mib: int,
    require_client_cert: bool,
    force: bool,
) -> None:
    """Write a production mosquitto set-up: TLS, one password per account, an ACL."""
    try:
        setup = MosquittoSetup(
            namespace=namespace,
            hostname=hostname,
            port=port,
            bind=bind,
            tls=not no_tls,
            local_port=local_port or None,
            agents=split_names(agents),
            clients=split_names(clients),
            planner_user=planner_user,
            monitor_user=monitor_user,
            install_dir=install_dir.rstrip("/") or "/",
            data_dir=None if no_persistence else data_dir,
            max_packet_mib=max_packet_mib,
            require_client_cert=require_client_cert,
        )
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    _refuse_non_empty(out_dir, force)
    try:
        os.makedirs(out_dir, exist_ok=True)
        for name, text in render_all(setup).items():
            path = os.path.join(out_dir, name)
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
            click.echo(f"wrote {path}")
    except OSError as exc:
        raise click.ClickException(f"cannot write into {out_dir!r}: {exc.strerror}") from None
    if not setup.agents:
        click.echo(
            "note: no --agents given, so no device can connect yet; "
            "re-run with --agents id1,id2 (usernames = agent ids)",
            err=True,
        )
    click.echo(f"next: follow {os.path.join(out_dir, 'README-broker.md')} (certificates, users)")
