"""The msgpack codec for control-plane messages: bounded, pickle-free, version-checked.

``encode`` writes a message as a msgpack map of its fields plus ``k`` (kind)
and ``v`` ([major, minor]). ``decode`` refuses anything that is not such a map
(too large, not msgpack, unknown kind, wrong field types, a newer major
version) with a :class:`DecodeError`/:class:`VersionError` whose text names the
problem, and ignores fields it does not know (forward compatibility).

A message carried *inside* another structure (the request envelope in a chunk header)
goes through the same checks: :func:`to_wire` gives its plain map and :func:`from_wire`
validates one. ``NamedTuple`` fields travel as msgpack arrays (a route hop is
``[agent_id, artifact]``) and are checked item by item.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, TypeVar, Union, get_args, get_origin

import msgpack

from edgeslice.broker.protocol import PROTOCOL_MAJOR, PROTOCOL_MINOR
from edgeslice.broker.protocol.errors import DecodeError, VersionError
from edgeslice.broker.protocol.messages import MESSAGE_TYPES, Message

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # control messages are small; data uses chunking.py
M = TypeVar("M", bound=Message)


def packb(obj: Any) -> bytes:
    """msgpack-encode plain data (bin type for bytes, no extension types)."""
    return msgpack.packb(obj, use_bin_type=True)


def unpackb(data: bytes | bytearray | memoryview, max_bytes: int = MAX_MESSAGE_BYTES) -> Any:
    """Bounded msgpack decoding: size-limited (msgpack bounds every length by the input size),
    no ext types, no pickle."""
    if len(data) > max_bytes:
        raise DecodeError(f"message of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=False,
            ext_hook=_refuse_ext,
        )
    except DecodeError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        raise DecodeError(f"not valid msgpack: {type(exc).__name__}: {exc}") from None


def _refuse_ext(code: int, data: bytes) -> Any:
    raise DecodeError(f"msgpack extension type {code} is not allowed")


def to_wire(msg: Message) -> dict[str, Any]:
    """The plain dict that goes on the wire (also used by the monitor's JSON output)."""
    body = dataclasses.asdict(msg)
    body["k"] = msg.KIND
    body["v"] = [PROTOCOL_MAJOR, PROTOCOL_MINOR]
    return body


def encode(msg: Message) -> bytes:
    return packb(to_wire(msg))


def decode(data: bytes | bytearray | memoryview, expected: type[M] | None = None) -> M:
    """Decode and validate one message; ``expected`` restricts the accepted class."""
    obj = unpackb(data)
    if not isinstance(obj, dict):
        raise DecodeError(f"expected a msgpack map, got {type(obj).__name__}")
    check_version(obj.get("v"))
    kind = obj.get("k")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise DecodeError(f"unknown message kind {kind!r}; known: {sorted(MESSAGE_TYPES)}")
    if expected is not None and cls is not expected:
        raise DecodeError(f"expected a {expected.KIND!r} message, got {kind!r}")
    return typing.cast(M, from_dict(cls, obj, cls.KIND))


def from_wire(obj: Any, cls: type[M]) -> M:
    """Validate a message already unpacked into a plain map (e.g. a chunk header's ``m``).

    The same checks as :func:`decode`; the kind ``k`` and version ``v`` may be missing
    (protocol 1.1 senders wrote the envelope's fields without them), but a present ``k``
    must be ``cls.KIND`` and a present ``v`` must not be a newer major.
    """
    if not isinstance(obj, dict):
        raise DecodeError(f"{cls.KIND}: expected a map, got {type(obj).__name__}")
    check_version(obj.get("v"))
    kind = obj.get("k", cls.KIND)
    if kind != cls.KIND:
        raise DecodeError(f"expected a {cls.KIND!r} message, got {kind!r}")
    return typing.cast(M, from_dict(cls, obj, cls.KIND))


def check_version(v: Any) -> None:
    """Refuse a newer protocol major version; accept older minors and a missing field."""
    if v is None:
        return
    if not (isinstance(v, list) and v and isinstance(v[0], int)):
        raise DecodeError(f"bad protocol version field {v!r}")
    if v[0] > PROTOCOL_MAJOR:
        raise VersionError(
            f"message uses protocol v{v[0]}, this edgeslice speaks v{PROTOCOL_MAJOR}: "
            "upgrade edgeslice on this device (pip install -U edgeslice)"
        )


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def from_dict(cls: type[Any], obj: dict[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from ``obj``: check types, ignore unknown keys."""
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in obj:
            no_default = (
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            )
            if no_default:
                raise DecodeError(f"{where}: missing field {f.name!r}")
            continue
        kwargs[f.name] = _coerce(obj[f.name], hints[f.name], f"{where}.{f.name}")
    return cls(**kwargs)


@functools.cache
def _parts(tp: Any) -> tuple[Any, tuple[Any, ...]]:
    """``get_origin`` and ``get_args`` of a schema type, once per type (decoding a tiled
    request's envelope checks thousands of nested values)."""
    return get_origin(tp), get_args(tp)


_EXACT = (int, str)  # list items checked by exact type in one pass (bool is not an int here)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    if tp is Any:
        return value
    origin, args = _parts(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        errors = []
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _coerce(value, arm, where)
            except DecodeError as exc:
                errors.append(str(exc))
        raise DecodeError("; ".join(errors))
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (str, bool, bytes):
        if isinstance(value, tp):
            return value
    elif origin is list:
        if isinstance(value, list):
            (item,) = args or (Any,)
            if item in _EXACT and set(map(type, value)) <= {item}:
                return list(value)
            return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            key_tp, val_tp = args or (Any, Any)
            return {
                _coerce(k, key_tp, f"{where} key"): _coerce(v, val_tp, f"{where}[{k!r}]")
                for k, v in value.items()
            }
    elif dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, dict):
            return from_dict(tp, value, where)
    elif isinstance(tp, type) and issubclass(tp, tuple) and hasattr(tp, "_fields"):
        if isinstance(value, (list, tuple)) and len(value) == len(tp._fields):
            hints = _hints(tp)
            return tp(
                *(
                    _coerce(v, hints[n], f"{where}.{n}")
                    for n, v in zip(tp._fields, value, strict=True)
                )
            )
    else:  # pragma: no cover - a schema bug, not a wire problem
        raise TypeError(f"unsupported schema type {tp!r} at {where}")
    expected = getattr(tp, "__name__", tp)
    raise DecodeError(f"{where}: expected {expected}, got {type(value).__name__}")
