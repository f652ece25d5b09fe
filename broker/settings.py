"""Broker connection settings: URL parsing, credentials, TLS files, and the shared CLI options.

Every command that talks to a broker takes the same options, each also read
from an ``EDGESLICE_*`` environment variable; they end up in one frozen
:class:`BrokerSettings` that :class:`broker.client.MqttClient` takes.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import click

from edgeslice.broker.protocol.errors import ConfigError

DEFAULT_BROKER_URL = "mqtt://127.0.0.1:1883"
DEFAULT_NAMESPACE = "edgeslice"
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class BrokerSettings:
    """Where the broker is and how to authenticate; ``url`` is kept for messages."""

    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_insecure: bool = False
    namespace: str = DEFAULT_NAMESPACE
    keepalive: int = 30

    @property
    def url(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        return f"{scheme}://{self.host}:{self.port}"

    def with_overrides(self, **changes: Any) -> BrokerSettings:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def parse_broker_url(url: str, namespace: str = DEFAULT_NAMESPACE) -> BrokerSettings:
    """Parse ``mqtt://[user[:pass]@]host[:port]`` or ``mqtts://...`` (default ports 1883 / 8883).

    A bare ``host[:port]`` is taken as ``mqtt://``.
    """
    text = url.strip()
    if "://" not in text:
        text = "mqtt://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ConfigError(
            f"broker URL {url!r}: scheme must be mqtt:// or mqtts:// (got {parts.scheme}://)"
        )
    tls = parts.scheme in ("mqtts", "ssl")
    if not parts.hostname:
        raise ConfigError(f"broker URL {url!r} has no host; expected e.g. mqtt://192.168.1.10:1883")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise ConfigError(f"broker URL {url!r}: bad port ({exc})") from None
    if not _NAMESPACE_RE.match(namespace):
        raise ConfigError(
            f"namespace {namespace!r}: use 1-64 letters, digits, '.', '_' or '-' (no '/', '+', '#')"
        )
    return BrokerSettings(
        host=parts.hostname,
        port=port,
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        namespace=namespace,
    )


def _check_file(option: str, path: str | None) -> str | None:
    if path is not None and not os.path.isfile(path):
        raise ConfigError(f"{option} {path!r}: no such file")
    return path


F = TypeVar("F", bound=Callable[..., Any])


def connection_options(func: F) -> F:
    """Add --broker/--namespace/--username/--password/--tls-* and pass ``settings``."""

    @click.option(
        "--broker",
        "broker_url",
        envvar="EDGESLICE_BROKER",
        default=DEFAULT_BROKER_URL,
        show_default=True,
        help="Broker URL: mqtt://host[:port], or mqtts://host[:port] for TLS. "
        "[env EDGESLICE_BROKER]",
    )
    @click.option(
        "--namespace",
        envvar="EDGESLICE_NAMESPACE",
        default=DEFAULT_NAMESPACE,
        show_default=True,
        help="Topic namespace; fleets sharing a broker use different ones. "
        "[env EDGESLICE_NAMESPACE]",
    )
    @click.option(
        "--username", envvar="EDGESLICE_USERNAME", help="Broker user. [env EDGESLICE_USERNAME]"
    )
    @click.option(
        "--password",
        envvar="EDGESLICE_PASSWORD",
        help="Broker password (prefer the env var over the flag). [env EDGESLICE_PASSWORD]",
    )
    @click.option(
        "--tls-ca",
        envvar="EDGESLICE_TLS_CA",
        help="CA certificate file for mqtts://. [env EDGESLICE_TLS_CA]",
    )
    @click.option(
        "--tls-cert",
        envvar="EDGESLICE_TLS_CERT",
        help="Client certificate file. [env EDGESLICE_TLS_CERT]",
    )
    @click.option(
        "--tls-key",
        envvar="EDGESLICE_TLS_KEY",
        help="Client private key file. [env EDGESLICE_TLS_KEY]",
    )
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        url = kwargs.pop("broker_url")
        namespace = kwargs.pop("namespace")
        username = kwargs.pop("username")
        password = kwargs.pop("password")
        tls_ca = kwargs.pop("tls_ca")
        tls_cert = kwargs.pop("tls_cert")
        tls_key = kwargs.pop("tls_key")
        try:
            settings = parse_broker_url(url, namespace)
            if (tls_cert is None) != (tls_key is None):
                raise ConfigError("--tls-cert and --tls-key go together; give both or neither")
            settings = settings.with_overrides(
                username=username,
                password=password,
                tls_ca=_check_file("--tls-ca", tls_ca),
                tls_cert=_check_file("--tls-cert", tls_cert),
                tls_key=_check_file("--tls-key", tls_key),
            )
            if (settings.tls_ca or settings.tls_cert) and not settings.tls:
                settings = replace(settings, tls=True)
        except ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="--broker / --tls-*") from None
        return func(*args, settings=settings, **kwargs)

    return wrapper  # type: ignore[return-value]
