"""The one exception tree of edgeslice; every error a user can see derives from it.

Tree::

    EdgesliceError
    ├── ConfigError            bad flag, env var, URL or file (names the source)
    │   └── ProfileError       a firmware profile is invalid (names file + field)
    ├── ProtocolError          a message that cannot be understood
    │   ├── DecodeError        not msgpack, too large, or wrong shape/types
    │   ├── VersionError       sent by a newer protocol major version
    │   └── TopicError         a topic outside the topic table
    ├── TransferError          a chunked transfer was refused (reason attribute)
    │   └── ChecksumError      reassembled bytes do not match the checksum
    ├── BrokerError            cannot connect / publish / subscribe to the broker
    ├── ArtifactError          a stage artifact is missing or unusable
    │   └── SignatureError     unsigned or tampered artifact: never loaded
    ├── PlanningError          no plan satisfies the fleet and the constraints
    └── InferenceError         a request failed
        ├── RemoteStageError   a stage on an agent failed (names stage + agent)
        └── RequestTimeout     no result before the deadline

Messages say what failed, where (agent, topic, request) and what to do next.
"""

from __future__ import annotations


class EdgesliceError(Exception):
    """Root of every error edgeslice raises on purpose."""


class ConfigError(EdgesliceError):
    """A flag, environment variable, URL or config file is invalid."""


class ProfileError(ConfigError):
    """A firmware profile file is missing a field or has a bad value."""


class ProtocolError(EdgesliceError):
    """A message on the wire cannot be understood."""


class DecodeError(ProtocolError):
    """Bytes are not a valid edgeslice message (not msgpack, too big, wrong fields)."""


class VersionError(ProtocolError):
    """A message comes from a newer, incompatible protocol major version."""


class TopicError(ProtocolError):
    """A topic does not belong to the edgeslice topic table."""


class TransferError(EdgesliceError):
    """A chunked transfer was refused; ``reason`` is a short machine-readable word."""

    def __init__(self, message: str, reason: str = "refused") -> None:
        super().__init__(message)
        self.reason = reason


class ChecksumError(TransferError):
    """A reassembled transfer does not match its checksum."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="checksum")


class BrokerError(EdgesliceError):
    """The MQTT broker cannot be reached, or refused a connect/publish/subscribe."""


class ArtifactError(EdgesliceError):
    """A stage artifact is missing, incomplete or cannot be loaded."""


class SignatureError(ArtifactError):
    """An artifact is unsigned or its signature does not verify: it is never loaded."""


class PlanningError(EdgesliceError):
    """No plan satisfies the fleet and the constraints."""


class InferenceError(EdgesliceError):
    """An inference request failed."""


class RemoteStageError(InferenceError):
    """A stage failed on an agent; the message names the stage, the agent and the cause."""

    def __init__(
        self,
        message: str,
        stage: int | None = None,
        agent: str | None = None,
        retryable: bool = False,
    ) -> None:
        super().__init__(message)
        self.stage = stage
        self.agent = agent
        self.retryable = retryable  # the plan changed or an agent was busy: a retry may work


class RequestTimeout(InferenceError):
    """No result arrived before the request's deadline."""
