"""Tiled (intra-layer) requests: piece rules, the gather buffer, and agents + client end to end.

The service tests run real agents and a real client on the in-memory broker, with a small
CNN tiled by hand (a 3x3 convolution split by input height, so each tile needs a halo row
from its neighbour; a 1x1 convolution split by output channels with sliced weights; a whole
head, or a 1x1 convolution split by width so the client gathers the output from pieces).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from memfleet import SETTINGS, agent_config, eventually, key_file, running
from torch import Tensor, nn

from edgeslice.agent.runtime import ArtifactCache
from edgeslice.agent.service import AgentService
from edgeslice.broker.fleetkey import load_signing_key
from edgeslice.broker.memory import MemoryBroker
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.boxes import Box, box_to_wire, crop, full_box, volume
from edgeslice.broker.protocol.chunking import encode_transfer
from edgeslice.broker.protocol.errors import DecodeError, RemoteStageError
from edgeslice.broker.protocol.messages import (
    AssignmentDesired,
    AssignmentReported,
    ErrorReply,
    PlanMessage,
    PlanStage,
    RequestEnvelope,
    StageAssignment,
    Tile,
)
from edgeslice.broker.protocol.pieces import (
    WHOLE,
    Gathered,
    PieceBuffer,
    PieceRefused,
    expected_boxes,
    join,
    piece_box,
    want_box,
)
from edgeslice.broker.protocol.tensors import pack_tensors
from edgeslice.broker.protocol.topics import Topics
from edgeslice.client.inference import InferenceClient
from edgeslice.planner.stages import StageArtifact, build_module_artifact

T = Topics("unit")
H = W = 12


# -- pure rules ------------------------------------------------------------------------
def test_piece_boxes_between_split_and_whole_tiles() -> None:
    rows = ((0, 8), (0, 7), (0, 12))
    assert piece_box(((0, 8), (0, 6), (0, 12)), rows) == ((0, 8), (0, 6), (0, 12))
    assert piece_box(((0, 8), (6, 12), (0, 12)), rows) == ((0, 8), (6, 7), (0, 12))
    assert piece_box(((0, 8), (8, 12), (0, 12)), ((0, 8), (0, 7), (0, 12))) is None
    assert piece_box(WHOLE, rows) == rows  # a whole sender crops for a split receiver
    assert piece_box(rows, WHOLE) == rows  # a split sender gives a whole receiver its box
    assert piece_box(WHOLE, WHOLE) == WHOLE
    outc = [((0, 3), (0, 12), (0, 12)), ((3, 6), (0, 12), (0, 12))]
    expected = expected_boxes(outc, WHOLE)
    assert expected == outc and want_box(expected, WHOLE) == ((0, 6), (0, 12), (0, 12))
    assert expected_boxes(None, rows) == [rows]  # from the client: exactly its in_box


def test_join_assembles_overlapping_halo_pieces() -> None:
    x = torch.randn(1, 2, 6, 5)
    full = full_box(x.shape)
    top, bottom = ((0, 2), (0, 4), (0, 5)), ((0, 2), (3, 6), (0, 5))
    pieces = [(top, [crop(x, full, top)]), (bottom, [crop(x, full, bottom)])]
    assert torch.equal(join(pieces, full)[0], x)
    with pytest.raises(ValueError):
        join(pieces[:1], full)


def test_buffer_completes_refuses_and_expires() -> None:
    a, b = ((0, 2), (0, 3)), ((0, 2), (3, 6))
    want = ((0, 2), (0, 6))
    buf: PieceBuffer[str] = PieceBuffer(max_open=2, max_open_per_sender=2, idle_s=1.0)
    assert buf.add("k", [a, b], want, a, "A", 10, 0.0, "c1") is None
    assert buf.add("k", [a, b], want, a, "A2", 10, 0.1, "c1") is None  # a repeat replaces
    done = buf.add("k", [a, b], want, b, "B", 10, 0.2, "c1")
    assert isinstance(done, Gathered) and done.pieces == [(a, "A2"), (b, "B")]
    assert len(buf) == 0
    forged = buf.add("k", [a, b], want, ((0, 2), (1, 4)), "?", 10, 0.3, "c1")
    assert isinstance(forged, PieceRefused) and forged.reason == "malformed"
    gap = buf.add("g", [a], want, a, "A", 10, 0.3, "c1")
    assert isinstance(gap, PieceRefused) and gap.reason == "uncovered"
    assert buf.add("k1", [a, b], want, a, "A", 10, 0.3, "c1") is None
    assert buf.add("k2", [a, b], want, a, "A", 10, 0.3, "c1") is None
    full = buf.add("k3", [a, b], want, a, "A", 10, 0.3, "c1")
    assert isinstance(full, PieceRefused) and full.reason == "too_many_open"
    other = buf.add("k1", [a], want, a, "A", 10, 0.4, "c1")
    assert isinstance(other, PieceRefused) and other.reason == "mismatch"
    gone = buf.expire(1.35)
    assert sorted(r.key for r in gone) == ["k1", "k2"] and {r.reason for r in gone} == {"timed_out"}
    assert len(buf) == 0


def test_tiles_and_boxes_are_type_checked_on_decode() -> None:
    tile = Tile("a1", "f" * 64, [[0, 3], [0, 7], [0, 12]], [[0, 8], [0, 6], [0, 12]])
    env = RequestEnvelope(route=[], reply_to="c", tiles=[[tile]], box=[[0, 3], [0, 7], [0, 12]])
    wire = codec.to_wire(env)
    assert codec.from_wire(codec.unpackb(codec.packb(wire)), RequestEnvelope) == env
    for bad in (
        {"box": [[0, True]]},  # a bool is not a coordinate
        {"box": [[0, 1.5]]},
        {"tiles": [[[7, "f", [], []]]]},  # agent id not a string
        {"tiles": [[["a1", "f", [[0, 3]]]]]},  # a tile of three fields
    ):
        with pytest.raises(DecodeError):
            codec.from_wire(dict(wire, **bad), RequestEnvelope)
    # a 1.3 sender's envelope and plan stage (no tile fields) read as pipeline ones
    old = {"route": [["pi-1", "a" * 64]], "reply_to": "c", "k": "request", "v": [1, 3]}
    back = codec.from_wire(old, RequestEnvelope)
    assert (back.tiles, back.box, back.attempt) == ([], [], 0)
    stage = {"stage": 0, "start_segment": 0, "end_segment": 2, "agents": ["pi-1"]}
    plan = {"k": "plan", "v": [1, 3], "model": "m", "plan_id": "p", "plan_version": 1}
    plan |= {"objective": "latency", "strategy": "edgeslice", "stages": [stage]}
    decoded = codec.decode(codec.packb(plan), PlanMessage)
    assert decoded.stages[0].tiles == [] and decoded.stages[0].tiling == ""


def test_tile_cache_checks_tiles_once_per_plan_and_leaves_timings_on_the_wire() -> None:
    from edgeslice.broker.protocol.errors import DecodeError
    from edgeslice.broker.protocol.messages import StageTiming
    from edgeslice.broker.protocol.pieces import TileCache, wire_timings

    tiles = [[Tile("a1", "f" * 64, [[0, 3], [0, 6], [0, W]], [[0, 8], [0, 5], [0, W]])]]
    timing = StageTiming(0, "a1", compute_s=0.1, sent_bytes=10)
    env = RequestEnvelope(route=[], reply_to="c", tiles=tiles, timings=[timing])
    meta = codec.unpackb(codec.packb(codec.to_wire(env)))  # as a header's "m" arrives
    cache = TileCache(size=2)
    first = cache.envelope(meta, "c", "p", 1)
    assert first.tiles == tiles and first.timings == []  # timings are not decoded here
    assert wire_timings(meta) == meta["timings"] and wire_timings({"timings": 3}) == []
    again = cache.envelope(dict(meta), "c", "p", 1)
    assert again.tiles is first.tiles  # looked up, not decoded again
    bad = dict(meta, tiles=[[["a1", "f" * 64, "rows", [[0, 8], [0, 5], [0, W]]]]])
    with pytest.raises(DecodeError):  # another wire form under the same key is checked
        cache.envelope(bad, "c", "p", 1)
    for version in (2, 3, 4):
        cache.envelope(meta, "c", "p", version)
    assert len(cache._tiles) == 2  # bounded


# -- a CNN tiled by hand ---------------------------------------------------------------
class Conv3Rows(nn.Module):
    """Output rows [lo, hi) of a 3x3, padding-1 convolution from input rows with halo."""

    def __init__(self, conv: nn.Conv2d, lo: int, hi: int) -> None:
        super().__init__()
        self.conv = conv
        self.pad = (1, 1, 1 if lo == 0 else 0, 1 if hi == H else 0)

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.conv.weight, self.conv.bias
        return torch.relu(F.conv2d(F.pad(x, self.pad), w, b))


def halo_rows(lo: int, hi: int) -> tuple[int, int]:
    return max(0, lo - 1), min(H, hi + 1)


def conv1x1_slice(conv: nn.Conv2d, c0: int, c1: int) -> nn.Module:
    part = nn.Conv2d(conv.in_channels, c1 - c0, 1)
    assert part.bias is not None and conv.bias is not None
    with torch.no_grad():
        part.weight.copy_(conv.weight[c0:c1])
        part.bias.copy_(conv.bias[c0:c1])
    return part


class Head(nn.Module):
    def __init__(self, fc: nn.Linear) -> None:
        super().__init__()
        self.fc = fc

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.mean(dim=(2, 3)))


def layers() -> tuple[nn.Conv2d, nn.Conv2d, nn.Conv2d, nn.Linear]:
    torch.manual_seed(0)
    return nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 1), nn.Conv2d(6, 4, 1), nn.Linear(6, 4)


def whole_model(tiled_tail: bool) -> nn.Module:
    conv3, conv1, tail, fc = layers()
    last: nn.Module = tail if tiled_tail else Head(fc)
    return nn.Sequential(conv3, nn.ReLU(), conv1, last).eval()


Spec = tuple[str, nn.Module, Box, Box]  # agent, tile module, in_box, out_box


def tiled_blocks(agents: Sequence[str], tiled_tail: bool) -> list[list[Spec]]:
    """Stage -> tiles: inh split of the 3x3 conv (halo), outc split of the 1x1, then a head
    on one agent or (``tiled_tail``) a 1x1 conv split by width over two agents."""
    a, b, c = agents
    conv3, conv1, tail, fc = layers()
    rows = [(a, 0, 5), (b, 5, H)]  # uneven on purpose
    stage0: list[Spec] = [
        (agent, Conv3Rows(conv3, lo, hi), ((0, 3), halo_rows(lo, hi), (0, W)),
         ((0, 8), (lo, hi), (0, W)))
        for agent, lo, hi in rows
    ]  # fmt: skip
    stage1: list[Spec] = [
        (agent, conv1x1_slice(conv1, c0, c1), ((0, 8), (0, H), (0, W)), ((c0, c1), (0, H), (0, W)))
        for agent, c0, c1 in ((a, 0, 2), (b, 2, 6))
    ]
    if not tiled_tail:
        return [stage0, stage1, [(c, Head(fc), WHOLE, WHOLE)]]
    stage2: list[Spec] = [
        (agent, tail, ((0, 6), (0, H), (w0, w1)), ((0, 4), (0, H), (w0, w1)))
        for agent, w0, w1 in ((c, 0, 7), (a, 7, W))
    ]
    return [stage0, stage1, stage2]


def build(
    blocks: list[list[Spec]], x: Tensor, tmp_path: Path
) -> list[list[tuple[Spec, StageArtifact]]]:
    """Export and sign every tile, checked against the whole model's activations."""
    key = load_signing_key(key_file(tmp_path))
    out = []
    act = x
    with torch.no_grad():
        for index, tiles in enumerate(blocks):
            stage = []
            whole_in = full_box(act.shape)
            nxt: Tensor | None = None
            for spec in tiles:
                _agent, module, in_box, out_box = spec
                tile_in = act if in_box == WHOLE else crop(act, whole_in, in_box)
                got = module(tile_in)
                art = build_module_artifact(
                    module, [tile_in], [got], model="cnn", index=index,
                    start_segment=index, end_segment=index + 1, key=key,
                )  # fmt: skip
                stage.append((spec, art))
                if out_box == WHOLE:
                    nxt = got
                else:
                    if nxt is None:
                        shape = [1] + [hi for _lo, hi in full_box_of(tiles)]
                        nxt = torch.zeros(shape)
                    nxt[(slice(None), *(slice(lo, hi) for lo, hi in out_box))] = got
            assert nxt is not None
            act = nxt
            out.append(stage)
    return out


def full_box_of(tiles: list[Spec]) -> Box:
    return tuple((0, max(s[3][d][1] for s in tiles)) for d in range(len(tiles[0][3])))


def plan_of(built: list[list[tuple[Spec, StageArtifact]]], version: int) -> PlanMessage:
    stages = []
    for index, tiles in enumerate(built):
        wire = [
            Tile(agent, art.sha256, box_to_wire(i), box_to_wire(o))
            for (agent, _m, i, o), art in tiles
        ]
        agents = [t.agent_id for t in wire]
        stages.append(PlanStage(index, index, index + 1, agents, tiles=wire, tiling="hand"))
    specs = [{"shape": [1, 3, H, W], "dtype": "float32", "name": "x"}]
    return PlanMessage("cnn", "p1", version, "latency", "intra", stages, specs, ready=True)


async def assign(
    broker: MemoryBroker, built: list[list[tuple[Spec, StageArtifact]]], version: int
) -> None:
    """Publish every agent's tiles as its desired assignment; wait until all are ready."""
    planner = broker.client(f"planner-{version}")
    await planner.connect()
    wanted: dict[str, list[StageAssignment]] = {}
    for index, tiles in enumerate(built):
        for (agent, _m, in_box, out_box), art in tiles:
            wanted.setdefault(agent, []).append(
                StageAssignment(
                    index, art.sha256, art.size, index, index + 1,
                    in_box=box_to_wire(in_box), out_box=box_to_wire(out_box),
                )
            )  # fmt: skip
    for agent, stages in wanted.items():
        desired = AssignmentDesired(agent, "p1", version, model="cnn", stages=stages)
        await planner.publish(T.assignment_desired(agent), codec.encode(desired), 1, True)

    def ready() -> bool:
        for agent in wanted:
            payload = broker.retained_payload(T.assignment_reported(agent))
            rep = codec.decode(payload, AssignmentReported) if payload else None
            if rep is None or rep.state != "ready" or rep.plan_version != version:
                return False
        return True

    await eventually(ready, what="tiles loaded")
    plan = plan_of(built, version)
    await planner.publish(T.plan("cnn"), codec.encode(plan), qos=1, retain=True)


def sent_bytes(
    built: list[list[tuple[Spec, StageArtifact]]], out_shape: torch.Size
) -> dict[tuple[int, str], int]:
    """(stage, agent) -> float32 bytes its tile sends: its output's intersection with every
    next-stage tile's input on another agent, or its output box for the client."""
    out = {}
    for stage, tiles in enumerate(built):
        for (agent, _m, _in, out_box), _art in tiles:
            if stage == len(built) - 1:
                box = out_box if out_box != WHOLE else full_box(out_shape)
                out[(stage, agent)] = 4 * volume(box)
                continue
            pieces = [
                piece_box(out_box, next_in)
                for (other, _n, next_in, _o), _a in built[stage + 1]
                if other != agent
            ]
            out[(stage, agent)] = sum(4 * volume(p) for p in pieces if p is not None)
    return out


def cache(built: list[list[tuple[Spec, StageArtifact]]], tmp_path: Path) -> None:
    for tiles in built:
        for (agent, *_rest), art in tiles:
            ArtifactCache(tmp_path / agent / "artifacts").put(art.sha256, art.data)


@pytest.mark.parametrize("tiled_tail", [False, True], ids=["whole-head", "tiled-tail"])
def test_tiled_plan_serves_the_whole_models_outputs(tmp_path: Path, tiled_tail: bool) -> None:
    x = torch.randn(1, 3, H, W)
    built = build(tiled_blocks(("a1", "a2", "a3"), tiled_tail), x, tmp_path)
    cache(built, tmp_path)
    with torch.no_grad():
        expected = whole_model(tiled_tail)(x)

    async def scenario() -> None:
        broker = MemoryBroker()
        agents = [
            AgentService(agent_config(a, tmp_path), transport=broker.factory)
            for a in ("a1", "a2", "a3")
        ]
        async with running(agents[0].run), running(agents[1].run), running(agents[2].run):
            await eventually(lambda: all(a.dataplane for a in agents), what="agents up")
            await assign(broker, built, 1)
            async with InferenceClient(SETTINGS, "cnn", transport=broker.factory) as client:
                await client.wait_ready(10.0)
                inputs = [x, *(torch.randn(1, 3, H, W) for _ in range(3))]
                results = await asyncio.gather(*(client.infer(i, timeout=20.0) for i in inputs))
                model = whole_model(tiled_tail)
                with torch.no_grad():
                    for i, result in zip(inputs, results, strict=True):
                        assert result.outputs[0].shape == expected.shape
                        assert torch.allclose(result.outputs[0], model(i), atol=1e-5)
                timed = {(t["stage"], t["agent"]) for t in results[0].timings}
                assert timed == {
                    (s, spec[0]) for s, tiles in enumerate(built) for spec, _a in tiles
                }
                for result in results:  # each tile's payload bytes to other agents / the client
                    sent = {(t["stage"], t["agent"]): t["sent_bytes"] for t in result.timings}
                    assert sent == sent_bytes(built, expected.shape)
                assert not client.requests.open and client.dropped == 0
        pieces_left = [len(a.dataplane.tiles.buffer) for a in agents]
        assert pieces_left == [0, 0, 0]
        # a1 and a2 hand each other stage 1's input; their own share never left the process
        for agent in agents:
            own = T.inbox(agent.agent_id, "x").rsplit("/", 1)[0] + "/"
            sent = [m.topic for m in broker.published if m.sender == agent.client.client_id]
            assert sent and not any(topic.startswith(own) for topic in sent)

    asyncio.run(scenario())


def _piece(
    plan: PlanMessage, stage: int, box: Box, tensor: Tensor, reply_to: str, attempt: int = 1
) -> list[bytes]:
    """The chunks of one piece of a tiled request, as a client or an agent sends them."""
    meta, payload = pack_tensors([tensor])
    env = RequestEnvelope(
        route=[],
        reply_to=reply_to,
        tensors=meta,
        tiles=[s.tiles for s in plan.stages],
        box=box_to_wire(box),
        attempt=attempt,
    )
    kind = "request" if stage == 0 else "activation"
    return encode_transfer(
        payload, request_id=f"r{stage}-{attempt}", kind=kind, plan_id=plan.plan_id,
        plan_version=plan.plan_version, stage=stage, meta=codec.to_wire(env),
    ).chunks  # fmt: skip


def test_bad_pieces_are_answered_with_errors_and_the_agent_serves_on(tmp_path: Path) -> None:
    """A forged box, a malformed box, a garbage envelope and a piece whose siblings never
    come each get an error naming agent, stage and request; the agent keeps serving."""
    x = torch.randn(1, 3, H, W)
    built = build(tiled_blocks(("a1", "a2", "a3"), False), x, tmp_path)
    cache(built, tmp_path)
    plan = plan_of(built, 1)

    async def scenario() -> None:
        broker = MemoryBroker()
        agents = [
            AgentService(agent_config(a, tmp_path), transport=broker.factory)
            for a in ("a1", "a2", "a3")
        ]
        rogue = broker.client("rogue")
        await rogue.connect()
        await rogue.subscribe(T.client_results("rogue"), qos=1)
        async with running(agents[0].run), running(agents[1].run), running(agents[2].run):
            await eventually(lambda: all(a.dataplane for a in agents), what="agents up")
            agents[0].dataplane.tiles.buffer.idle_s = 0.3
            await assign(broker, built, 1)
            inbox = T.inbox("a1", "rogue")
            in_box = ((0, 3), (0, 6), (0, W))  # a1's stage-0 input
            sends = [
                _piece(plan, 0, ((0, 3), (0, 4), (0, W)), x[:, :, :4], "rogue"),  # forged box
                _piece(plan, 0, in_box, x[:, :, :6], "someone-else"),  # not its own results
                _piece(plan, 1, ((0, 8), (5, H), (0, W)), torch.randn(1, 8, 7, W), "rogue"),
            ]
            bad = dict(plan.stages[0].tiles[0]._asdict(), in_box=[[5, 2]])
            garbage = _piece(plan, 0, in_box, x[:, :, :6], "rogue", attempt=2)
            env = codec.unpackb(garbage[0])  # re-encode its header with a malformed box
            env["m"]["tiles"][0][0] = list(bad.values())
            sends.append([codec.packb(env)])
            for chunks in sends:
                for chunk in chunks:
                    await rogue.publish(inbox, chunk, qos=1)
            replies: list[ErrorReply] = []
            while len(replies) < 4:
                msg = await rogue.next_message(5.0)
                assert msg is not None, f"only {len(replies)} error replies: {replies}"
                header = codec.unpackb(msg.payload)
                replies.append(codec.from_wire(header["m"], ErrorReply))
            text = " | ".join(r.error for r in replies)
            assert all(r.agent == "a1" for r in replies), text
            assert "malformed" in text and "timed_out" in text and "someone-else" in text
            assert "malformed tile box" in text, text
            assert len(agents[0].dataplane.tiles.buffer) == 0
            async with InferenceClient(SETTINGS, "cnn", transport=broker.factory) as client:
                await client.wait_ready(10.0)
                result = await client.infer(x, timeout=20.0)
                with torch.no_grad():
                    assert torch.allclose(result.outputs[0], whole_model(False)(x), atol=1e-5)

    asyncio.run(scenario())


def test_a_request_on_a_lost_tile_agent_is_resent_on_the_next_plan(tmp_path: Path) -> None:
    """A tile agent that never answers (x swallows its pieces): when the plan drops it the
    request is re-sent at once as attempt 2 to the new tiles and answered; a tile's error
    from a non-retryable failure fails the request at once."""
    x = torch.randn(1, 3, H, W)
    key_file(tmp_path)
    first = build(tiled_blocks(("a1", "x", "a2"), False), x, tmp_path)
    second = build(tiled_blocks(("a1", "a2", "a2"), False), x, tmp_path)
    cache(first, tmp_path)
    cache(second, tmp_path)

    async def scenario() -> None:
        broker = MemoryBroker()
        swallow = broker.client("x")
        await swallow.connect()
        await swallow.subscribe(T.agent_inbox("x"), qos=1)
        agents = [
            AgentService(agent_config(a, tmp_path), transport=broker.factory) for a in ("a1", "a2")
        ]
        async with running(agents[0].run), running(agents[1].run):
            await eventually(lambda: all(a.dataplane for a in agents), what="agents up")
            real = [[(s, a) for s, a in tiles if s[0] != "x"] for tiles in first]
            await assign(broker, real, 1)
            planner = broker.client("planner")
            await planner.connect()
            await planner.publish(T.plan("cnn"), codec.encode(plan_of(first, 1)), 1, True)
            async with InferenceClient(SETTINGS, "cnn", transport=broker.factory) as client:
                await client.wait_ready(10.0)
                task = asyncio.ensure_future(client.infer(x, timeout=30.0))
                assert await swallow.next_message(5.0) is not None  # x got its piece
                (req,) = client.requests.open.values()
                assert req.sends == 1 and set(req.route) == {"a1", "x", "a2"}
                await assign(broker, second, 2)
                result = await asyncio.wait_for(task, 10.0)
                assert result.attempts == 2 and client.requests.resends == 1
                assert {t["agent"] for t in result.timings} == {"a1", "a2"}
                with torch.no_grad():
                    assert torch.allclose(result.outputs[0], whole_model(False)(x), atol=1e-5)
                # a piece the plan cannot assemble is final, not retried for ever
                wrong = plan_of(second, 3)
                tiles = wrong.stages[2].tiles
                tiles[0] = tiles[0]._replace(in_box=[[0, 6]])  # rank 1 for a 3-d input
                await planner.publish(T.plan("cnn"), codec.encode(wrong), 1, True)
                await eventually(lambda: client.plan and client.plan.plan_version == 3)
                with pytest.raises(RemoteStageError) as caught:
                    await client.infer(x, timeout=10.0)
                assert caught.value.stage == 1 and not caught.value.retryable, caught.value
                assert "malformed tile box" in str(caught.value), caught.value

    asyncio.run(scenario())
