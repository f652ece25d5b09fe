"""The planner's frozen configuration: what it serves and how it plans, checked on creation.

planner/cli.py builds one from its flags; tests and benchmarks build one directly. Bad
values fail here with the flag's name, before any model is loaded or broker contacted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgeslice.broker.protocol.errors import ConfigError
from edgeslice.broker.settings import BrokerSettings
from edgeslice.planner.partition import STRATEGIES
from edgeslice.planner.replan import LoadShiftConfig

# "" (off), "dp", "auto", planner.tiling.STRATEGIES (not imported: it needs torch) and
# "fixed" (fixed fusion): planner/intramodes.py says what each plans
INTRA_LAYER = ("", "dp", "auto", "outc", "inh", "inw", "grid", "fixed")


@dataclass(frozen=True)
class PlannerConfig:
    """What the planner serves and how it plans."""

    model_spec: str
    broker: BrokerSettings
    objective: str = "throughput"
    # serve the highest-throughput plan whose predicted latency is within this bound (a
    # point of the Pareto front `edgeslice plan` prints: planner/pareto.py); None: no bound
    max_latency_s: float | None = None
    min_agents: int = 1
    max_segments: int = 48
    max_stages: int | None = None
    fleet_key_file: str | None = None
    replan_delay_s: float = 2.0
    # after the planner's own reconnect, how long the agents of the served plan have to
    # re-announce before it re-plans without them (ends early once all are back): paho
    # reconnects after 1, 2, 4, 8 s, so an agent may come back one back-off step later
    reconnect_grace_s: float = 10.0
    compression: str | None = None  # activation compression between stages: None|fp16|int8
    planner_id: str = "planner"
    strategy: str = "edgeslice"  # or a baseline of planner.partition.STRATEGIES (benchmarks)
    # serve a tiled (intra-layer) plan (planner/intraplan.py): "" off, "dp" (the DP picks
    # pipeline or a split per block), "auto" (every splittable segment split), one split
    # wherever it applies, or "fixed" (row splits fused over blocks of one length)
    intra_layer: str = ""
    max_fusion: int = 8  # tiled plans: at most this many segments per split block
    # on stop, clear the retained plan (the fleet is retired) instead of keeping it for the
    # agents to serve on and a restarted planner to adopt
    clear_plan_on_exit: bool = False
    # when a busy agent is derated and gets its work back (--busy-high/-low/-hold/-recover)
    load_shift: LoadShiftConfig = field(default_factory=LoadShiftConfig)
    # `edgeslice calibrate`'s file: price with the learned estimator where it beat the timed
    # model on held-out layers (planner/learnedcost.py); None: the analytic model only
    cost_model: str | None = None
    refit_interval_s: float = 60.0  # retrain on serving stage timings at most this often

    def __post_init__(self) -> None:
        if self.objective not in ("latency", "throughput"):
            raise ConfigError(f"--objective must be latency or throughput, not {self.objective!r}")
        if self.strategy != "edgeslice" and self.strategy not in STRATEGIES:
            known = ", ".join(["edgeslice", *STRATEGIES])
            raise ConfigError(f"--strategy {self.strategy!r} is unknown; use one of {known}")
        if self.max_latency_s is not None:
            if not self.max_latency_s > 0:
                raise ConfigError(f"--max-latency-ms must be > 0, not {self.max_latency_s * 1e3}")
            if self.objective != "throughput" or self.strategy != "edgeslice":
                raise ConfigError(
                    "--max-latency-ms serves the highest-throughput plan within the bound: "
                    "use it with --objective throughput and --strategy edgeslice"
                )
        if self.intra_layer not in INTRA_LAYER:
            known = ", ".join(INTRA_LAYER[1:])
            raise ConfigError(f"--intra-layer {self.intra_layer!r} is unknown; use {known}")
        if self.max_fusion < 1:
            raise ConfigError(f"--max-fusion must be >= 1, not {self.max_fusion}")
        if self.intra_layer and self.max_latency_s is not None:
            raise ConfigError("--intra-layer plans take no --max-latency-ms (yet)")
        if self.min_agents < 1:
            raise ConfigError("--min-agents must be >= 1")
        if self.replan_delay_s < 0:
            raise ConfigError("--replan-delay must be >= 0 seconds")
        if self.refit_interval_s <= 0:
            raise ConfigError("--refit-interval must be > 0 seconds")
        if self.reconnect_grace_s < 0:
            raise ConfigError("reconnect_grace_s must be >= 0 seconds")
        ls = self.load_shift
        if not 0 <= ls.low < ls.high <= 1 or ls.hold_s < 0 or ls.recover_s < 0:
            raise ConfigError(
                "--busy-low must be below --busy-high (both 0..1), --busy-hold and "
                f"--busy-recover >= 0 s; got {ls.low}, {ls.high}, {ls.hold_s}, {ls.recover_s}"
            )
