"""The pure parts of link emulation: link specs, pacing, the delay line and loss as TCP sees it.

Times are arguments, never read from a clock, so everything here is tested without
sockets; :mod:`broker.linkem` is the asyncio proxy that drives these pieces (its module
docstring explains the model and what it leaves out).
"""

from __future__ import annotations

import collections
import ipaddress
import json
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from edgeslice.broker.protocol.errors import ConfigError

MSS = 1448  # TCP payload per segment on Ethernet (1500 MTU, IPv4 + TCP timestamps)
MIN_RTO_S = 0.2  # Linux's minimum retransmission timeout
_PIECE_TIME_S = 0.004  # link time per piece: smooth pacing without a wake-up per segment
_MIN_PIECE, MAX_PIECE = 4096, 256 * 1024
T = TypeVar("T")


class LinkLike(Protocol):
    """A ``[link]`` table as loaded by ``firmware_profiles`` (its frozen ``LinkProfile``)."""

    @property
    def bandwidth_mbit(self) -> float: ...
    @property
    def latency_ms(self) -> float: ...
    @property
    def loss_pct(self) -> float: ...


@dataclass(frozen=True)
class LinkSpec:
    """One direction's shaping, applied to both: bytes/s (0 or inf = unlimited), one-way s, %."""

    bandwidth_bps: float = math.inf
    latency_s: float = 0.0
    loss_pct: float = 0.0

    def __post_init__(self) -> None:
        checks = (
            ("bandwidth_bps", self.bandwidth_bps, "a number >= 0 (0 or inf = unlimited)"),
            ("latency_s", self.latency_s, "a finite number of seconds >= 0"),
            ("loss_pct", self.loss_pct, "a percentage from 0 up to (not including) 100"),
        )
        for name, value, want in checks:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            ok = ok and not math.isnan(value) and value >= 0
            if name != "bandwidth_bps":
                ok = ok and math.isfinite(value)
            if name == "loss_pct":
                ok = ok and value < 100
            if not ok:
                raise ConfigError(f"link spec: {name}={value!r} is invalid; it must be {want}")

    @classmethod
    def from_mbit(cls, bandwidth_mbit: float, latency_ms: float, loss_pct: float = 0.0) -> LinkSpec:
        """The spec for profile units: Mbit/s (10^6 bit), one-way ms, percent."""
        for name, value in (("bandwidth_mbit", bandwidth_mbit), ("latency_ms", latency_ms)):
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ConfigError(f"link spec: {name}={value!r} is not a number")
        return cls(bandwidth_mbit * 1e6 / 8, latency_ms / 1000, loss_pct)

    @classmethod
    def from_profile_link(cls, link: Mapping[str, Any] | LinkLike) -> LinkSpec:
        """The spec for a firmware profile's ``[link]`` table (a dict or a ``LinkProfile``)."""
        if isinstance(link, Mapping):
            missing = [k for k in ("bandwidth_mbit", "latency_ms") if k not in link]
            if missing:
                raise ConfigError(
                    f"[link] table lacks {', '.join(missing)}: add bandwidth_mbit (Mbit/s), "
                    "latency_ms (one-way) and optionally loss_pct"
                )
            values = (link["bandwidth_mbit"], link["latency_ms"], link.get("loss_pct", 0.0))
        else:
            values = (link.bandwidth_mbit, link.latency_ms, link.loss_pct)
        try:
            return cls.from_mbit(*values)
        except ConfigError as exc:
            raise ConfigError(f"[link] table: {exc}") from None

    @property
    def unlimited(self) -> bool:
        """True when bandwidth is not shaped."""
        return self.bandwidth_bps == 0 or math.isinf(self.bandwidth_bps)

    @property
    def rtt_s(self) -> float:
        """The round trip this spec adds (latency in both directions)."""
        return 2 * self.latency_s

    @property
    def retransmit_timeout_s(self) -> float:
        """How long a piece with a lost segment is held back."""
        return max(MIN_RTO_S, 2 * self.rtt_s)

    def describe(self) -> str:
        """Human summary, e.g. ``8 Mbit/s, 20 ms one-way, 0 % loss``."""
        bw = "unlimited bandwidth" if self.unlimited else f"{self.bandwidth_bps * 8 / 1e6:g} Mbit/s"
        return f"{bw}, {self.latency_s * 1000:g} ms one-way, {self.loss_pct:g} % loss"


def piece_size(bandwidth_bps: float) -> int:
    """Bytes read and paced at once: about 4 ms of link time, between 4 KiB and 256 KiB."""
    if bandwidth_bps == 0 or math.isinf(bandwidth_bps):
        return MAX_PIECE
    return int(min(MAX_PIECE, max(_MIN_PIECE, bandwidth_bps * _PIECE_TIME_S)))


class Pacer:
    """Serialisation clock of one link direction: when the last byte of a piece has left."""

    def __init__(self, bandwidth_bps: float, burst_bytes: int = 0) -> None:
        self.bandwidth_bps = bandwidth_bps
        self._credit_s = 0.0 if bandwidth_bps in (0, math.inf) else burst_bytes / bandwidth_bps
        self._free_at = -math.inf

    def set_rate(self, bandwidth_bps: float, burst_bytes: int = 0) -> None:
        """Change the rate from now on; what is already booked keeps its time."""
        self.bandwidth_bps = bandwidth_bps
        self._credit_s = 0.0 if bandwidth_bps in (0, math.inf) else burst_bytes / bandwidth_bps

    def schedule(self, now: float, nbytes: int) -> float:
        """Book ``nbytes`` handed over at ``now``; the time the link has sent them.

        The link is busy until ``_free_at``; a piece starts then or now, whichever
        is later, but an idle link may lend up to ``burst_bytes`` of credit so a
        late wake-up of the reader does not leave the link idle for good.
        """
        if self.bandwidth_bps == 0 or math.isinf(self.bandwidth_bps):
            return now
        start = max(self._free_at, now - self._credit_s)
        self._free_at = start + nbytes / self.bandwidth_bps
        return max(self._free_at, now)


class LossModel:
    """Decides, reproducibly for a seed, which pieces are held back one retransmission timeout."""

    def __init__(self, loss_pct: float, rto_s: float, seed: int | str | None = None) -> None:
        self.loss = loss_pct / 100
        self.rto_s = rto_s
        self.held_back = 0
        self._rng = random.Random(seed)

    def penalty(self, nbytes: int) -> float:
        """Extra delay for a piece of ``nbytes``: ``rto_s`` if any of its segments is lost."""
        if self.loss <= 0 or nbytes <= 0:
            return 0.0
        p_piece = 1 - (1 - self.loss) ** math.ceil(nbytes / MSS)
        if self._rng.random() < p_piece:
            self.held_back += 1
            return self.rto_s
        return 0.0


class DelayLine(Generic[T]):
    """FIFO of items, each due ``latency_s`` (+ extra) after it was sent; never reordered."""

    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s
        self.bytes_queued = 0
        self._items: collections.deque[tuple[float, T, int]] = collections.deque()
        self._last_due = -math.inf

    def push(self, sent_at: float, item: T, nbytes: int, extra_s: float = 0.0) -> float:
        """Queue ``item``; returns when it is due (never before an item queued earlier)."""
        due = max(sent_at + self.latency_s + extra_s, self._last_due)
        self._last_due = due
        self._items.append((due, item, nbytes))
        self.bytes_queued += nbytes
        return due

    def next_due(self) -> float | None:
        """When the oldest item is due, or None if the line is empty."""
        return self._items[0][0] if self._items else None

    def pop_due(self, now: float) -> list[T]:
        """Remove and return, in order, every item due at ``now``."""
        out: list[T] = []
        while self._items and self._items[0][0] <= now:
            _, item, nbytes = self._items.popleft()
            self.bytes_queued -= nbytes
            out.append(item)
        return out

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class LinkStats:
    """Counters of one proxy: bytes delivered per direction, connections, held-back pieces."""

    bytes_up: int  # client -> target, delivered
    bytes_down: int  # target -> client, delivered
    connections: int
    open_connections: int
    held_back_up: int
    held_back_down: int


def write_shape_file(path: str | Path, spec: LinkSpec) -> None:
    """Write ``spec`` for a running proxy to pick up on SIGHUP (JSON in profile units),
    atomically: the proxy never reads half a file."""
    path = Path(path)
    bandwidth = 0.0 if spec.unlimited else spec.bandwidth_bps * 8 / 1e6
    body = {"bandwidth_mbit": bandwidth, "latency_ms": spec.latency_s * 1e3}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**body, "loss_pct": spec.loss_pct}), encoding="utf-8")
    tmp.replace(path)


def read_shape_file(path: str | Path) -> LinkSpec:
    """The spec in a shape file (``{"bandwidth_mbit", "latency_ms", "loss_pct"}``, 0 Mbit/s
    = unlimited); ConfigError naming the file when it is missing or wrong."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return LinkSpec.from_mbit(
            data["bandwidth_mbit"], data.get("latency_ms", 0.0), data.get("loss_pct", 0.0)
        )
    except (OSError, ValueError, KeyError, TypeError, ConfigError) as exc:
        raise ConfigError(f"link shape file {path}: {exc!r}") from None


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
