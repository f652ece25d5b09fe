"""The one exception tree of edgeslice; every error a user can see derives from it.

Tree (``code`` in brackets; ``R`` marks errors that are retryable)::

    EdgesliceError                [error]
    ├── ConfigError               [config]       bad flag, env var, URL or file (names source)
    │   └── ProfileError          [profile]      a firmware profile is invalid (file + field)
    ├── CgroupUnavailable         [cgroup]       an agent's limits cannot be applied on this
    │                                            machine (no cgroup fs, no permission; says why)
    ├── ProtocolError             [protocol]     a message that cannot be understood
    │   ├── DecodeError           [decode]       not msgpack, too large, or wrong shape/types
    │   ├── VersionError          [version]      sent by a newer protocol major version
    │   └── TopicError            [topic]        a topic outside the topic table
    ├── TransferError             [its reason] R a chunked transfer was refused (``reason``:
    │                                            checksum, buffer_full, expired, ...);
    │                                            not R for malformed, too_large, version
    ├── BrokerError               [broker]       cannot connect / publish / subscribe
    ├── ArtifactError             [artifact]     a stage artifact is missing or unusable
    │   └── SignatureError        [signature]    unsigned or tampered artifact: never loaded
    ├── PlanningError             [planning]     no plan satisfies the fleet and constraints
    └── InferenceError            [inference]    a request failed
        ├── RemoteStageError      [as sent]   R? a stage on an agent failed (names stage and
        │                                        agent; retryable and code as the agent said)
        ├── StageUnavailableError [stage_unavailable] R  the agent no longer runs the stage
        │                                        the route names: the plan changed
        ├── AgentBusyError        [busy]       R the agent's queue is full
        ├── AgentDrainingError    [draining]   R the agent is shutting down: the plan moved on
        ├── NoPlanError           [no_plan]      the plan was withdrawn (or its planner stopped
        │                                        and no online agent runs a stage): says why,
        │                                        raised at once, not after a timeout
        └── RequestTimeout        [timeout]      no result before the deadline

Two attributes travel with every error. ``retryable`` (class default ``False``) says that
the same request may succeed if sent again on the current, or the next, plan: the plan
changed under it, an agent was busy, a transfer was dropped for lack of room. Code decides
by this field, never by matching the message text. ``code`` is a short machine-readable
word (above), sent to the client in an error reply beside the human-readable message.
Messages say what failed, where (agent, topic, request) and what to do next.
"""

from __future__ import annotations


class EdgesliceError(Exception):
    """Root of every error edgeslice raises on purpose (``retryable``, ``code``: module doc)."""

    retryable: bool = False
    code: str = "error"


class ConfigError(EdgesliceError):
    """A flag, environment variable, URL or config file is invalid."""

    code = "config"


class ProfileError(ConfigError):
    """A firmware profile file is missing a field or has a bad value."""

    code = "profile"


class CgroupUnavailable(EdgesliceError):
    """An agent's limits cannot be applied on this machine; the message says why (shown to
    the user)."""

    code = "cgroup"


class ProtocolError(EdgesliceError):
    """A message on the wire cannot be understood."""

    code = "protocol"


class DecodeError(ProtocolError):
    """Bytes are not a valid edgeslice message (not msgpack, too big, wrong fields)."""

    code = "decode"


class VersionError(ProtocolError):
    """A message comes from a newer, incompatible protocol major version."""

    code = "version"


class TopicError(ProtocolError):
    """A topic does not belong to the edgeslice topic table."""

    code = "topic"


NOT_RETRYABLE_TRANSFER_REASONS = frozenset({"malformed", "too_large", "version"})


class TransferError(EdgesliceError):
    """A chunked transfer was refused; ``reason`` is a short machine-readable word.

    Retryable unless sending the same transfer again would be refused again
    (:data:`NOT_RETRYABLE_TRANSFER_REASONS`): a full buffer, too many open transfers,
    a stale plan or an expired deadline may all pass on the next attempt.
    """

    def __init__(self, message: str, reason: str = "refused") -> None:
        super().__init__(message)
        self.reason = reason
        self.code = reason
        self.retryable = reason not in NOT_RETRYABLE_TRANSFER_REASONS


class BrokerError(EdgesliceError):
    """The MQTT broker cannot be reached, or refused a connect/publish/subscribe."""

    code = "broker"


class ArtifactError(EdgesliceError):
    """A stage artifact is missing, incomplete or cannot be loaded."""

    code = "artifact"


class SignatureError(ArtifactError):
    """An artifact is unsigned or its signature does not verify: it is never loaded."""

    code = "signature"


class PlanningError(EdgesliceError):
    """No plan satisfies the fleet and the constraints."""

    code = "planning"


class InferenceError(EdgesliceError):
    """An inference request failed."""

    code = "inference"


class RemoteStageError(InferenceError):
    """A stage failed on an agent; the message names the stage, the agent and the cause."""

    def __init__(
        self,
        message: str,
        stage: int | None = None,
        agent: str | None = None,
        retryable: bool = False,
        code: str = "stage_failed",
    ) -> None:
        super().__init__(message)
        self.stage = stage
        self.agent = agent
        self.retryable = retryable  # the plan changed or an agent was busy: a retry may work
        self.code = code  # the agent's word for the failure (its exception's ``code``)


class StageUnavailableError(InferenceError):
    """An agent no longer runs the stage a request's route names: the plan changed; retry."""

    retryable = True
    code = "stage_unavailable"


class AgentBusyError(InferenceError):
    """An agent's queue is full; retry (the next route may pick another replica)."""

    retryable = True
    code = "busy"


class AgentDrainingError(InferenceError):
    """An agent is shutting down and takes no new requests; retry on the current plan."""

    retryable = True
    code = "draining"


class NoPlanError(InferenceError):
    """No plan can serve the request (the planner withdrew it, or is offline and the plan
    has no online agent for a stage); raised at once with the reason, not after a timeout."""

    code = "no_plan"


class RequestTimeout(InferenceError):
    """No result arrived before the request's deadline."""

    code = "timeout"
