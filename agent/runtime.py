"""Loads and runs stage artifacts with torch on the device; knows nothing of MQTT.

The agent service calls into this module from a worker thread: :class:`StageRuntime`
turns a sealed artifact into a :class:`LoadedStage` (the planner's Ed25519 signature
checked with its public key *before* ``torch.export.load`` sees a byte, since that call
may unpickle), a loaded stage maps a flat list of tensors to a flat list of tensors,
:class:`ArtifactCache` keeps sealed artifacts on disk by sha256 so a restart does not
refetch them (an artifact the runtime refuses is deleted from it), and
:func:`measure_gflops` is the short calibration run agents report at start-up. Under
``--emulate-mode paced`` both a stage run and the calibration go through the installed
:class:`agent.pacing.Pacer`, which holds them until the emulated device would be done.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from edgeslice.agent import pacing
from edgeslice.broker.calibration import measure_gflops as host_measure_gflops
from edgeslice.broker.protocol.artifacts import (
    STAGE_FORMAT,
    STAGE_KIND,
    PublicKey,
    TensorSpec,
    artifact_id,
    open_sealed,
)
from edgeslice.broker.protocol.errors import (
    ArtifactError,
    DecodeError,
    EdgesliceError,
    InferenceError,
    SignatureError,
)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 2 << 30  # refuse to inflate a compressed body beyond this
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def measure_gflops(seconds: float = 0.5, threads: int | None = None) -> float:
    """The calibration rate agents announce: this device's, or the paced device's."""
    pacer = pacing.current()
    if pacer is not None:
        return pacer.measure_gflops(seconds, threads)
    return host_measure_gflops(seconds, threads)


def set_threads(n: int) -> None:
    """Set torch's intra-op thread count (what an emulated small device is allowed to use)."""
    if n < 1:
        raise ValueError(f"thread count must be at least 1, got {n}")
    torch.set_num_threads(n)


@dataclass(frozen=True)
class StageInfo:
    """What the signed meta says about a stage."""

    sha256: str
    model: str
    index: int
    start_segment: int
    end_segment: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    param_bytes: int
    torch_version: str
    batchable: bool = False  # exported with a dynamic dim 0: requests may run together

    @classmethod
    def from_meta(cls, sha256: str, meta: dict[str, Any]) -> StageInfo:
        if meta.get("kind") != STAGE_KIND or meta.get("format") != STAGE_FORMAT:
            raise ArtifactError(
                f"artifact {sha256[:12]} is {meta.get('kind')!r}/{meta.get('format')!r}, "
                f"expected kind {STAGE_KIND!r} in format {STAGE_FORMAT!r}"
            )
        try:
            return cls(
                sha256=sha256,
                model=str(meta["model"]),
                index=int(meta["index"]),
                start_segment=int(meta["start_segment"]),
                end_segment=int(meta["end_segment"]),
                inputs=tuple(TensorSpec.from_wire(s) for s in meta["inputs"]),
                outputs=tuple(TensorSpec.from_wire(s) for s in meta["outputs"]),
                param_bytes=int(meta.get("param_bytes", 0)),
                torch_version=str(meta.get("torch", "")),
                batchable=meta.get("batchable") is True,
            )
        except (KeyError, TypeError, ValueError, DecodeError) as exc:
            raise ArtifactError(f"artifact {sha256[:12]} has malformed meta: {exc}") from exc


class LoadedStage:
    """A deserialized stage program: ``run(list of tensors) -> list of tensors``."""

    def __init__(self, info: StageInfo, program: Callable[..., Any]) -> None:
        self.info = info
        self._program = program

    @property
    def sha256(self) -> str:
        return self.info.sha256

    def check_inputs(self, inputs: Sequence[Tensor]) -> None:
        """Raise :class:`InferenceError` naming the first input that does not fit the spec."""
        specs = self.info.inputs
        label = f"stage {self.info.index} of model {self.info.model!r}"
        if len(inputs) != len(specs):
            raise InferenceError(f"{label} takes {len(specs)} input tensors, got {len(inputs)}")
        for i, (value, spec) in enumerate(zip(inputs, specs, strict=True)):
            if not isinstance(value, Tensor):
                raise InferenceError(f"{label} input {i} is {type(value).__name__}, not a tensor")
            dtype = str(value.dtype).removeprefix("torch.")
            if dtype != spec.dtype or tuple(value.shape) != spec.shape:
                raise InferenceError(
                    f"{label} input {i} ({spec.name}) must be {spec.describe()}, got "
                    f"{dtype}{list(value.shape)}; was it produced under another plan?"
                )

    def run(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        """Run the stage under ``torch.inference_mode`` after checking the inputs."""
        self.check_inputs(inputs)
        pacer = pacing.current()  # emulating a slower device: hold until it would be done
        with torch.inference_mode():
            result = (
                self._program(*inputs)
                if pacer is None
                else pacer.run(
                    self._program, *inputs, key=pacing.program_key(self.info.sha256, inputs)
                )
            )
        return self._check_outputs(result)

    def run_batch(self, requests: Sequence[Sequence[Tensor]]) -> list[list[Tensor]]:
        """Run several requests' inputs as one batch (concatenated on dim 0) and split the
        outputs back, one list per request, in order. A stage that is not ``batchable``
        (or a single request) runs them one by one. Each request's inputs are checked
        first, so one bad request fails the whole call: callers check them beforehand."""
        if len(requests) == 1 or not self.info.batchable:
            return [self.run(inputs) for inputs in requests]
        for inputs in requests:
            self.check_inputs(inputs)
        stacked = [torch.cat(parts) for parts in zip(*requests, strict=True)]
        pacer = pacing.current()
        with torch.inference_mode():
            result = (
                self._program(*stacked)
                if pacer is None
                else pacer.run(
                    self._program, *stacked, key=pacing.program_key(self.info.sha256, stacked)
                )
            )
        outputs = self._check_outputs(result)
        rows = [spec.shape[0] for spec in self.info.outputs]
        split = [out.split(n) for out, n in zip(outputs, rows, strict=True)]
        if any(len(parts) != len(requests) for parts in split):
            raise InferenceError(
                f"stage {self.info.index} of model {self.info.model!r} returned a batch that "
                f"does not split into {len(requests)} requests"
            )
        return [[parts[i] for parts in split] for i in range(len(requests))]

    def _check_outputs(self, result: Any) -> list[Tensor]:
        outputs = list(result) if isinstance(result, tuple | list) else [result]
        if len(outputs) != len(self.info.outputs):
            raise InferenceError(
                f"stage {self.info.index} of model {self.info.model!r} returned "
                f"{len(outputs)} tensors, its spec says {len(self.info.outputs)}"
            )
        return outputs


class StageRuntime:
    """Verifies and deserializes stage artifacts; keeps loaded programs by sha256."""

    def __init__(self) -> None:
        self._loaded: dict[str, LoadedStage] = {}
        self._lock = threading.Lock()

    def load(
        self,
        artifact: bytes,
        key: PublicKey,
        sha256: str | None = None,
        cache: ArtifactCache | None = None,
    ) -> LoadedStage:
        """Verify the signature, then load; raises ``SignatureError`` before any unpickling.

        ``key`` is the planner's public key. ``sha256`` is the name the artifact was asked
        for: bytes that hash to anything else are refused (a signed artifact replayed
        under another name). An artifact refused for any reason is deleted from ``cache``
        so it neither lingers on disk nor is loaded from there again.
        """
        try:
            return self._load(artifact, key, sha256)
        except EdgesliceError as exc:
            if cache is not None and sha256 is not None:
                cache.discard(sha256, exc)
            raise

    def _load(self, artifact: bytes, key: PublicKey, wanted: str | None) -> LoadedStage:
        sha = artifact_id(artifact)
        if wanted is not None and sha != wanted:
            raise SignatureError(
                f"artifact asked for as {wanted[:12]} is really {sha[:12]} (its bytes hash "
                "to another name: replayed or corrupted); refusing to load it"
            )
        meta, body = open_sealed(artifact, key)  # signature first, always
        with self._lock:
            if sha in self._loaded:
                return self._loaded[sha]
        info = StageInfo.from_meta(sha, meta)
        expected = meta.get("body_sha256")  # of the stored (possibly compressed) body
        if expected is not None and hashlib.sha256(body).hexdigest() != expected:
            raise ArtifactError(f"artifact {sha[:12]}: body digest does not match its meta")
        body = self._decompress(sha, str(meta.get("compression", "none")), body)
        start = time.perf_counter()
        try:
            program = torch.export.load(io.BytesIO(body)).module()
        except Exception as exc:
            raise ArtifactError(
                f"artifact {sha[:12]} (stage {info.index} of {info.model!r}) does not load: "
                f"{type(exc).__name__}: {exc}; it was built with torch {info.torch_version}, "
                f"this device has torch {torch.__version__}"
            ) from exc
        stage = LoadedStage(info, program)
        with self._lock:
            self._loaded[sha] = stage
        log.info(
            "loaded stage model=%s stage=%d sha=%s bytes=%d seconds=%.2f",
            info.model,
            info.index,
            sha[:12],
            len(artifact),
            time.perf_counter() - start,
        )
        return stage

    @staticmethod
    def _decompress(sha: str, compression: str, body: bytes) -> bytes:
        if compression == "none":
            return body
        if compression != "zlib":
            raise ArtifactError(f"artifact {sha[:12]} uses unknown compression {compression!r}")
        inflater = zlib.decompressobj()
        try:
            out = inflater.decompress(body, MAX_BODY_BYTES)
        except zlib.error as exc:
            raise ArtifactError(f"artifact {sha[:12]}: corrupt zlib body ({exc})") from exc
        if inflater.unconsumed_tail:
            raise ArtifactError(f"artifact {sha[:12]} inflates beyond {MAX_BODY_BYTES} bytes")
        return out

    def get(self, sha: str) -> LoadedStage | None:
        with self._lock:
            return self._loaded.get(sha)

    def unload(self, sha: str) -> None:
        """Forget a loaded stage (its memory is freed once no request holds it)."""
        with self._lock:
            self._loaded.pop(sha, None)

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/edgeslice/artifacts``, default ``~/.cache/edgeslice/artifacts``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgeslice" / "artifacts"


class ArtifactCache:
    """Sealed artifacts on disk, one file per sha256; a file that fails its digest is dropped."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory).expanduser() if directory else default_cache_dir()

    def path(self, sha: str) -> Path:
        if not _SHA_RE.match(sha):
            raise ArtifactError(f"{sha!r} is not a sha256 hex digest")
        return self.directory / f"{sha}.artifact"

    def has(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def get(self, sha: str) -> bytes | None:
        """The cached bytes, or None when absent or corrupt (a corrupt file is deleted)."""
        path = self.path(sha)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if artifact_id(data) != sha:
            log.warning("cached artifact %s is corrupt; deleting %s", sha[:12], path)
            path.unlink(missing_ok=True)
            return None
        return data

    def put(self, sha: str, data: bytes) -> Path:
        """Store ``data`` under ``sha`` atomically (write a temp file, then rename)."""
        path = self.path(sha)
        if artifact_id(data) != sha:
            raise ArtifactError(f"refusing to cache artifact: its sha256 is not {sha[:12]}")
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def remove(self, sha: str) -> None:
        self.path(sha).unlink(missing_ok=True)

    def discard(self, sha: str, reason: Exception) -> None:
        """Delete a cached artifact the runtime refused (says why in the log)."""
        path = self.path(sha)
        if path.is_file():
            log.warning("deleting refused artifact %s (%s): %s", sha[:12], path, reason)
        path.unlink(missing_ok=True)
