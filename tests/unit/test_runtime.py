"""The agent's stage runtime: verify first, check inputs, cache on disk, calibrate."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
import torch

from edgeslice.agent.runtime import ArtifactCache, StageRuntime, measure_gflops, set_threads
from edgeslice.broker.fleetkey import generate_key
from edgeslice.broker.protocol.artifacts import artifact_id, seal
from edgeslice.broker.protocol.errors import ArtifactError, InferenceError, SignatureError
from edgeslice.planner.modelspec import load_model
from edgeslice.planner.profile import profile_model
from edgeslice.planner.stages import build_stages

KEY = generate_key()  # the planner signs with this...
PUBLIC = KEY.public_key()  # ...agents verify with this
BRANCHY = Path(__file__).resolve().parents[2] / "examples" / "branchy_model.py"


@pytest.fixture(scope="module")
def stages():
    loaded = load_model(f"{BRANCHY}:build")
    profile = profile_model(loaded.module, loaded.example_inputs, max_segments=6)
    artifacts = build_stages(loaded.module, loaded.example_inputs, profile, [0, 3, 6], KEY)
    return loaded.module, loaded.example_inputs, artifacts


def test_loaded_stages_run_and_chain(stages) -> None:
    model, inputs, artifacts = stages
    runtime = StageRuntime()
    first = runtime.load(artifacts[0].data, PUBLIC)
    middle = first.run(list(inputs))
    assert [tuple(t.shape) for t in middle] == [s.shape for s in artifacts[1].input_specs]
    (out,) = runtime.load(artifacts[1].data, PUBLIC).run(middle)
    with torch.no_grad():
        assert torch.allclose(out, model(*inputs))
    assert sorted(runtime.loaded()) == sorted(a.sha256 for a in artifacts)
    assert runtime.load(artifacts[0].data, PUBLIC) is first  # loaded once, verified every time


def test_tampered_artifact_is_never_loaded(stages) -> None:
    _, _, artifacts = stages
    data = bytearray(artifacts[0].data)
    data[len(data) // 2] ^= 0xFF  # inside the torch.export archive
    runtime = StageRuntime()
    with pytest.raises(SignatureError):
        runtime.load(bytes(data), PUBLIC)
    with pytest.raises(SignatureError, match=r"fleet\.pub"):
        runtime.load(artifacts[0].data, generate_key().public_key())
    assert runtime.loaded() == []


def _cached(tmp_path: Path, data: bytes) -> tuple[ArtifactCache, str]:
    cache = ArtifactCache(tmp_path / "cache")
    sha = artifact_id(data)
    cache.put(sha, data)  # as the fetcher does, before the runtime has looked at it
    return cache, sha


def test_refused_artifacts_are_deleted_from_the_cache(tmp_path, stages) -> None:
    _, _, artifacts = stages
    tampered = bytearray(artifacts[0].data)
    tampered[len(tampered) // 2] ^= 0xFF
    envelope = msgpack.unpackb(artifacts[0].data, raw=False)
    old_hmac = msgpack.packb({**envelope, "v": 1}, use_bin_type=True)
    refused = {
        "flipped payload byte": bytes(tampered),
        "signed by another key": seal(b"PK", envelope["meta"], generate_key()),
        "old HMAC-sealed artifact": old_hmac,
        "re-packed under a new name": msgpack.packb({**envelope, "x": 1}, use_bin_type=True),
    }
    runtime = StageRuntime()
    for what, data in refused.items():
        cache, sha = _cached(tmp_path / what, data)
        with pytest.raises(SignatureError):
            runtime.load(data, PUBLIC, sha256=sha, cache=cache)
        assert not cache.has(sha), what
        assert list(cache.directory.iterdir()) == [], what
    assert runtime.loaded() == []
    good, sha = _cached(tmp_path / "good", artifacts[0].data)
    runtime.load(artifacts[0].data, PUBLIC, sha256=sha, cache=good)
    assert good.has(sha)  # an accepted artifact stays cached for the next start


def test_an_artifact_asked_for_by_another_name_is_refused(tmp_path, stages) -> None:
    _, _, artifacts = stages
    runtime = StageRuntime()
    with pytest.raises(SignatureError, match="hash to another name"):
        runtime.load(artifacts[0].data, PUBLIC, sha256=artifacts[1].sha256)
    assert runtime.loaded() == []


def test_wrong_inputs_are_named(stages) -> None:
    _, inputs, artifacts = stages
    stage = StageRuntime().load(artifacts[0].data, PUBLIC)
    image, meta = inputs
    with pytest.raises(InferenceError, match="takes 2 input tensors, got 1"):
        stage.run([image])
    with pytest.raises(InferenceError, match=r"input 1 \(meta\) must be meta:float32\[1, 8\]"):
        stage.run([image, meta.double()])
    with pytest.raises(InferenceError, match=r"input 0 \(image\)"):
        stage.run([image[:, :, :32], meta])


def test_signed_but_not_a_stage_is_an_artifact_error() -> None:
    data = seal(b"PK not really", {"kind": "something-else"}, KEY)
    with pytest.raises(ArtifactError, match="expected kind"):
        StageRuntime().load(data, PUBLIC)


def test_signed_garbage_body_is_an_artifact_error(stages) -> None:
    _, _, artifacts = stages
    envelope = msgpack.unpackb(artifacts[0].data, raw=False)
    meta = {k: v for k, v in envelope["meta"].items() if k != "body_sha256"}
    with pytest.raises(ArtifactError, match="does not load"):
        StageRuntime().load(seal(b"not a zip archive", meta, KEY), PUBLIC)


def test_cache_round_trip_and_corruption(tmp_path, stages) -> None:
    _, _, artifacts = stages
    cache = ArtifactCache(tmp_path / "cache")
    data = artifacts[0].data
    sha = artifact_id(data)
    assert not cache.has(sha) and cache.get(sha) is None
    path = cache.put(sha, data)
    assert cache.has(sha) and cache.get(sha) == data
    assert [p.name for p in path.parent.iterdir()] == [f"{sha}.artifact"]  # no temp files left
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0x01
    path.write_bytes(bytes(raw))
    assert cache.get(sha) is None  # detected...
    assert not cache.has(sha)  # ...and dropped, so the agent refetches


def test_cache_refuses_wrong_digests_and_odd_names(tmp_path) -> None:
    cache = ArtifactCache(tmp_path)
    with pytest.raises(ArtifactError, match="sha256"):
        cache.put("0" * 64, b"data")
    with pytest.raises(ArtifactError, match="not a sha256"):
        cache.get("../../etc/passwd")


def test_default_cache_dir_follows_xdg(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert ArtifactCache().directory == tmp_path / "edgeslice" / "artifacts"


def test_measure_gflops_is_positive_and_restores_threads() -> None:
    before = torch.get_num_threads()
    assert measure_gflops(seconds=0.05, threads=1) > 0.1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError):
        set_threads(0)
