"""One exception family for protocol faults: everything a peer can get wrong on the wire."""

from __future__ import annotations

MAX_REASON_CHARS = 512


class ProtocolError(Exception):
    """A message from the network was refused; carries who sent it, where, and why."""

    reason_code = "protocol_error"

    def __init__(self, reason: str, *, device: str | None = None, topic: str | None = None):
        # a reason may quote what a peer sent: bounded, as it goes into acks, the ledger, logs
        if len(reason) > MAX_REASON_CHARS:
            reason = reason[: MAX_REASON_CHARS - 3] + "..."
        super().__init__(reason)
        self.reason = reason
        self.device = device
        self.topic = topic

    def __str__(self) -> str:
        where = []
        if self.device:
            where.append(f"device={self.device}")
        if self.topic:
            where.append(f"topic={self.topic}")
        return f"{self.reason} ({', '.join(where)})" if where else self.reason

    def at(self, *, device: str | None = None, topic: str | None = None) -> ProtocolError:
        """Fill in the device and topic once the shell knows them; returns self."""
        self.device = self.device or device
        self.topic = self.topic or topic
        return self


class DecodeError(ProtocolError):
    """Bytes that are not a well-formed fedmq message (bad msgpack, too large, bad array)."""

    reason_code = "decode_error"


class SchemaError(ProtocolError):
    """A well-formed message with missing, extra or mistyped fields, or an unknown version."""

    reason_code = "schema_error"


class ShapeMismatch(ProtocolError):
    """Tensors that do not match the model they claim to update."""

    reason_code = "shape_mismatch"


class StaleUpdate(ProtocolError):
    """An update for a round or model version that is not the open one."""

    reason_code = "stale_update"


class DuplicateUpdate(ProtocolError):
    """An update id that was already counted."""

    reason_code = "duplicate_update"


class Unauthorized(ProtocolError):
    """A message on a topic its sender may not use (e.g. an update for another device)."""

    reason_code = "unauthorized"


class ChunkError(ProtocolError):
    """A chunk that cannot belong to a payload: inconsistent count, digest, or over a bound."""

    reason_code = "chunk_error"


class OverCapacity(ProtocolError):
    """A message that would grow a bounded table past its cap (e.g. the device table)."""

    reason_code = "over_capacity"


class OutOfBounds(ProtocolError):
    """An update whose values no honest device sends: a non-finite or absurd L2 norm."""

    reason_code = "out_of_bounds"


class DuplicateReport(ProtocolError):
    """A second, different evaluation report of one version from one device."""

    reason_code = "duplicate_report"
