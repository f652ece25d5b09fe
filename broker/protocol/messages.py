"""Control-plane message schemas: frozen, versioned dataclasses (the data plane is chunking.py).

Each message class has a ``KIND`` (written on the wire as ``k``) and the
protocol version it was written with (``v = [major, minor]``). Decoding is
tolerant in one direction only: unknown fields are ignored (a newer *minor*
version may add fields), a newer *major* version is refused (see codec.py).
Field types are checked on decode so that a wrong-but-valid msgpack map is a
:class:`~broker.protocol.errors.DecodeError`, never an ``AttributeError`` deep
inside a service.

Two messages travel inside a data-plane transfer instead of on their own topic: the
:class:`RequestEnvelope` (header field ``m`` of request/activation/result transfers) and
the :class:`ErrorReply` (``m`` of error transfers), see :mod:`.chunking`.

Tiled (intra-layer) plans (protocol 1.4): a :class:`PlanStage` may list :class:`Tile` s,
each an agent computing one output box of the stage from one input box (boxes.py); a
request of such a plan carries every stage's tiles in its envelope (``tiles``) and each of
its transfers the box of the piece it holds (``box``), see :mod:`.pieces`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

ONLINE = "online"
OFFLINE = "offline"
DRAINING = "draining"  # agents only: shutting down, still finishing what it holds


@dataclass(frozen=True)
class Message:
    """Base of every control-plane message."""

    KIND: ClassVar[str] = ""


@dataclass(frozen=True)
class Status(Message):
    """Agent (or planner) liveness; retained; the last will carries ``state="offline"``.

    ``draining`` (agents only): the agent was asked to stop (SIGTERM/SIGINT) and
    finishes the requests it holds; it is not usable for new plans (a reader that knows
    only ``online``/``offline`` sees it as not online, which is the intended effect).
    It ends with ``offline`` (reason ``shutdown``).
    """

    KIND: ClassVar[str] = "status"
    agent_id: str
    state: str  # ONLINE | DRAINING | OFFLINE
    session: int = 0  # increases on every start, so a stale retained message is recognisable
    ts: float = 0.0
    reason: str = ""  # why offline: "shutdown", "lost" (last will); why draining: "draining"


class BatchSpeedup(NamedTuple):
    """Measured throughput gain of running ``batch`` requests at once; wire ``[batch, x]``."""

    batch: int
    speedup: float  # batch x time(1 request) / time(batch requests), calibration kernel


@dataclass(frozen=True)
class Info(Message):
    """Agent birth certificate: what it is and what it measured at start-up; retained."""

    KIND: ClassVar[str] = "info"
    agent_id: str
    profile: str
    profile_data: dict[str, Any] = field(default_factory=dict)
    gflops: float = 0.0  # measured effective fp32 GFLOP/s (calibration run)
    cpu_count: int = 0
    ram_bytes: int = 0
    memory_budget_bytes: int = 0
    hostname: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    emulated: bool = False
    limits: dict[str, Any] = field(default_factory=dict)
    link_rtt_s: float = 0.0  # measured agent -> broker -> agent round trip
    link_bandwidth_bps: float = 0.0  # measured through the broker, bytes/s
    threads: int = 0
    session: int = 0
    ts: float = 0.0
    # dynamic batching (agent/batching.py; minor-version additions, absent from older
    # agents): the most requests one stage run takes (0 = not said, 1 = batching off) and
    # the calibration kernel's speed-up at batch sizes up to it
    max_batch: int = 0
    batch_speedup: list[BatchSpeedup] = field(default_factory=list)


@dataclass(frozen=True)
class Telemetry(Message):
    """Live resource readings, published every telemetry interval at QoS 0."""

    KIND: ClassVar[str] = "telemetry"
    agent_id: str
    ts: float
    cpu_percent: float
    cpu_per_core: list[float] = field(default_factory=list)
    mem_used_bytes: int = 0
    mem_total_bytes: int = 0
    mem_percent: float = 0.0
    load_avg: list[float] = field(default_factory=list)
    temperature_c: float | None = None
    net_bytes_sent: int = 0
    net_bytes_recv: int = 0
    rss_bytes: int = 0
    queue_depth: int = 0
    in_flight: int = 0
    malformed_messages: int = 0
    busy: float = 0.0  # fraction of the last interval the stage worker computed (0..1)
    stage_timings: dict[str, dict[str, float]] = field(default_factory=dict)


class Tile(NamedTuple):
    """One tile of a tiled stage; wire ``[agent_id, artifact, in_box, out_box]``.

    The agent runs ``artifact`` on the part ``in_box`` of the stage's input (halo included)
    and produces the part ``out_box`` of its output; boxes are ``boxes.box_to_wire`` lists
    in whole-activation coordinates. An empty box means *the whole* tensors (any number of
    them): a stage that is not split is one tile with empty boxes.
    """

    agent_id: str
    artifact: str
    in_box: list[list[int]]
    out_box: list[list[int]]


@dataclass(frozen=True)
class StageAssignment:
    """One stage an agent should run: which artifact, and where its output goes."""

    stage: int
    artifact: str  # sha256 of the sealed artifact
    size: int = 0
    start_segment: int = 0
    end_segment: int = 0
    input_specs: list[dict[str, Any]] = field(default_factory=list)
    output_specs: list[dict[str, Any]] = field(default_factory=list)
    # a tile of a tiled stage (protocol 1.4, informative: requests carry their boxes)
    in_box: list[list[int]] = field(default_factory=list)
    out_box: list[list[int]] = field(default_factory=list)
    # the most requests the agent may run at once for this stage (newer than 1.4, like
    # Info.max_batch): None = the agent's own --max-batch; 1 where the planner measured that
    # batching slows the stage down. An older agent ignores it and batches as before
    max_batch: int | None = None


@dataclass(frozen=True)
class AssignmentDesired(Message):
    """What the planner wants an agent to run (retained). Empty ``stages`` = run nothing."""

    KIND: ClassVar[str] = "assignment_desired"
    agent_id: str
    plan_id: str
    plan_version: int
    model: str = ""
    stages: list[StageAssignment] = field(default_factory=list)
    ts: float = 0.0


@dataclass(frozen=True)
class AssignmentReported(Message):
    """What an agent runs now, or why it cannot (retained)."""

    KIND: ClassVar[str] = "assignment_reported"
    agent_id: str
    plan_id: str
    plan_version: int
    state: str  # "ready" | "loading" | "error" | "idle"
    stages: list[int] = field(default_factory=list)
    error: str = ""
    load_s: float = 0.0
    ts: float = 0.0


@dataclass(frozen=True)
class Command(Message):
    """A request to an agent (``cmd/{name}``); the reply goes to ``cmd-res/{name}``."""

    KIND: ClassVar[str] = "command"
    request_id: str
    name: str
    args: dict[str, Any] = field(default_factory=dict)
    sender: str = ""
    ts: float = 0.0


@dataclass(frozen=True)
class CommandResult(Message):
    """An agent's answer to a :class:`Command`, matched by ``request_id``."""

    KIND: ClassVar[str] = "command_result"
    request_id: str
    agent_id: str
    name: str
    ok: bool
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    ts: float = 0.0


@dataclass(frozen=True)
class PlannerStatus(Message):
    """Planner liveness and a one-line summary of its current plan; retained, LWT offline."""

    KIND: ClassVar[str] = "planner_status"
    state: str
    planner_id: str = ""
    model: str = ""
    plan_id: str = ""
    plan_version: int = 0
    summary: str = ""
    ts: float = 0.0


@dataclass(frozen=True)
class PlanStage:
    """One stage of a published plan: its segments, replicas and predictions."""

    stage: int
    start_segment: int
    end_segment: int
    agents: list[str]
    artifact: str = ""
    predicted_compute_s: float = 0.0
    predicted_transfer_s: float = 0.0
    out_bytes: int = 0
    param_bytes: int = 0
    replica_period_s: list[float] = field(default_factory=list)  # per agent, predicted busy s
    # tiled stage (protocol 1.4): the tiles that split it ("agents" lists their agents, in
    # order); empty = a pipeline stage run whole by one of ``agents``. ``tiling`` names the
    # split: outc | inh | inw | grid ("" when the tiles are not a split, e.g. one whole tile)
    tiles: list[Tile] = field(default_factory=list)
    tiling: str = ""
    # what the stage's agents are told in their StageAssignment.max_batch (newer than 1.4,
    # informative here): None = their own --max-batch, 1 = do not batch this stage
    max_batch: int | None = None


@dataclass(frozen=True)
class PlanMessage(Message):
    """The current plan of a model (``plans/{model}``, retained): what clients route by."""

    KIND: ClassVar[str] = "plan"
    model: str
    plan_id: str
    plan_version: int
    objective: str
    strategy: str
    stages: list[PlanStage]
    input_specs: list[dict[str, Any]] = field(default_factory=list)
    predicted_latency_s: float = 0.0
    predicted_period_s: float = 0.0  # batch 1: what a few requests in flight measure
    compression: str = ""
    ready: bool = False  # every agent reported the assignment as ready
    ts: float = 0.0
    # set (with no stages) when the planner can serve no plan on the agents it has: the plan
    # is withdrawn and clients fail at once with this reason instead of waiting (an older
    # client ignores the field and sees a plan that never becomes ready)
    reason: str = ""
    # period with every agent's queue full, stages batching where they gain (planner/
    # batchcost.py; newer than 1.4, 0 = not said)
    predicted_saturated_period_s: float = 0.0


class RouteHop(NamedTuple):
    """One stage of a request's route; on the wire a 2-list ``[agent_id, artifact]``."""

    agent_id: str
    artifact: str  # sha256 of the stage artifact the agent must run


@dataclass(frozen=True)
class StageTiming:
    """Where one stage's time went, measured by the agent that ran it (seconds)."""

    stage: int
    agent: str
    recv_s: float = 0.0  # first chunk -> last chunk arrived on the agent
    transfer_s: float = 0.0  # previous hop's send -> first chunk here (clocks of two hosts)
    queue_s: float = 0.0  # waiting for the stage worker (and for the rest of its batch)
    compute_s: float = 0.0  # the stage itself (the whole batch's run when batched)
    batch: int = 1  # requests that ran together in this stage run (agent/batching.py)
    # tensor payload bytes this stage run sent on through the broker for this request (to
    # the next stage's agents or the client; pieces an agent hands itself are not sent).
    # Newer than 1.4: an older hop drops it, and a missing value decodes as 0
    sent_bytes: int = 0


@dataclass(frozen=True)
class RequestEnvelope(Message):
    """What travels with a request's tensors from hop to hop (transfer header field ``m``).

    The client writes it; each agent runs the stage its ``route`` names, appends its
    :class:`StageTiming`, swaps ``tensors`` for its outputs and forwards it. An agent
    re-encodes the envelope, so a field added by a newer minor survives only hops that
    know it: such fields must be ones an older hop may drop.
    """

    KIND: ClassVar[str] = "request"
    route: list[RouteHop]
    reply_to: str  # client id; the result goes to clients/{reply_to}/results
    tensors: list[dict[str, Any]] = field(default_factory=list)  # tensors.pack_tensors meta
    model: str = ""
    compression: str = ""  # between stages: "" (none), "fp16" or "int8"
    sent_at: float = 0.0  # unix time the previous hop started sending
    timings: list[StageTiming] = field(default_factory=list)  # one per stage run so far
    # tiled requests (protocol 1.4; pieces.py): per stage, its tiles (then ``route`` is
    # empty, so an agent older than 1.4 refuses the request instead of running a piece as
    # if it were the whole input); ``box``: the part of the activation entering stage
    # ``st`` (the transfer's header) that this transfer's tensors hold ([] = whole);
    # ``attempt``: which send of the request id this is (the client's count, from 1), so
    # pieces of two sends never meet in one gather buffer
    tiles: list[list[Tile]] = field(default_factory=list)
    box: list[list[int]] = field(default_factory=list)
    attempt: int = 0


@dataclass(frozen=True)
class ErrorReply(Message):
    """Why a request failed, sent to its client as an ``error`` transfer (header field ``m``).

    ``retryable`` is the failing error's own field (see errors.py); ``code`` its short word.
    """

    KIND: ClassVar[str] = "error_reply"
    error: str  # human-readable: what failed, where, what to do
    stage: int
    agent: str
    retryable: bool = False
    code: str = "error"
    timings: list[StageTiming] = field(default_factory=list)  # stages that did finish


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.KIND: cls
    for cls in (
        Status,
        Info,
        Telemetry,
        AssignmentDesired,
        AssignmentReported,
        Command,
        CommandResult,
        PlannerStatus,
        PlanMessage,
        RequestEnvelope,
        ErrorReply,
    )
}
