"""Split payloads into chunks that fit the broker's limit, and put them back together.

Pure code: no sockets, no clock (time comes in as `now`). Reassembly accepts chunks in
any order and duplicates, verifies the sha256 of the whole payload, and is bounded in
bytes held, open payloads and age, so a peer that sends half a payload costs nothing
for long.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from fedmq.errors import ChunkError
from fedmq.wire import CHUNK_OVERHEAD, Chunk, encode_chunk

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024
MIN_MESSAGE_BYTES = 1024


def chunk_data_size(max_message_bytes: int) -> int:
    """How many payload bytes fit in one chunk message of at most max_message_bytes."""
    if max_message_bytes < MIN_MESSAGE_BYTES:
        raise ValueError(
            f"max_message_bytes must be at least {MIN_MESSAGE_BYTES}, got {max_message_bytes}"
        )
    return max_message_bytes - CHUNK_OVERHEAD


def split_payload(payload: bytes, payload_id: str, max_message_bytes: int) -> list[Chunk]:
    """Cut payload into chunks whose encoded messages are at most max_message_bytes each."""
    step = chunk_data_size(max_message_bytes)
    digest = hashlib.sha256(payload).digest()
    count = max(1, -(-len(payload) // step))
    return [
        Chunk(
            payload_id=payload_id,
            index=i,
            count=count,
            total_size=len(payload),
            digest=digest,
            data=bytes(payload[i * step : (i + 1) * step]),
        )
        for i in range(count)
    ]


def encode_chunks(payload: bytes, payload_id: str, max_message_bytes: int) -> list[bytes]:
    """split_payload, each chunk encoded as its wire message."""
    return [encode_chunk(c) for c in split_payload(payload, payload_id, max_message_bytes)]


@dataclass
class _Partial:
    count: int
    total_size: int
    digest: bytes
    first_seen: float
    parts: dict[int, bytes] = field(default_factory=dict)
    held: int = 0
    wire_bytes: int = 0


@dataclass(frozen=True)
class Completed:
    """A payload whose every chunk arrived and whose digest matched."""

    key: tuple[str, str]  # (source, payload_id)
    payload: bytes
    chunks: int
    wire_bytes: int = 0  # what its chunks weighed on the wire, as the caller reported them


class Reassembler:
    """Collects chunks per (source, payload id) until a payload is whole."""

    def __init__(
        self,
        *,
        max_payload_bytes: int = 64 * 1024 * 1024,
        max_open: int = 256,
        max_total_bytes: int = 256 * 1024 * 1024,
        max_chunks: int = 65536,
        max_age_s: float = 600.0,
    ) -> None:
        if min(max_payload_bytes, max_open, max_total_bytes, max_chunks) <= 0 or max_age_s <= 0:
            raise ValueError("reassembly bounds must all be positive")
        self.max_payload_bytes = max_payload_bytes
        self.max_open = max_open
        self.max_total_bytes = max_total_bytes
        self.max_chunks = max_chunks
        self.max_age_s = max_age_s
        self._open: dict[tuple[str, str], _Partial] = {}
        self.held_bytes = 0
        self.expired = 0

    @property
    def open_payloads(self) -> int:
        return len(self._open)

    def add(
        self, chunk: Chunk, *, source: str, now: float, wire_bytes: int = 0
    ) -> Completed | None:
        """Take one chunk; return the payload once whole, None while waiting (or a duplicate).

        A payload sent again after it completed reassembles again: deduplicating whole
        payloads (update ids) is the caller's job, which must answer a resend anyway.
        Raises ChunkError for a chunk that contradicts its payload or breaks a bound.
        """
        self.expire(now)
        key = (source, chunk.payload_id)
        if chunk.total_size > self.max_payload_bytes:
            raise ChunkError(
                f"payload {chunk.payload_id}: {chunk.total_size} bytes exceeds the "
                f"{self.max_payload_bytes} byte limit",
                device=source,
            )
        if chunk.count > self.max_chunks:
            raise ChunkError(
                f"payload {chunk.payload_id}: {chunk.count} chunks exceeds {self.max_chunks}",
                device=source,
            )
        part = self._open.get(key)
        if part is None:
            if len(self._open) >= self.max_open:
                raise ChunkError(
                    f"too many payloads in flight ({self.max_open}); dropped {chunk.payload_id}",
                    device=source,
                )
            part = _Partial(chunk.count, chunk.total_size, chunk.digest, now)
            self._open[key] = part
        elif (part.count, part.total_size, part.digest) != (
            chunk.count,
            chunk.total_size,
            chunk.digest,
        ):
            self._drop(key)
            raise ChunkError(
                f"payload {chunk.payload_id}: chunk {chunk.index} disagrees with earlier chunks",
                device=source,
            )
        if chunk.index in part.parts:
            if part.parts[chunk.index] != chunk.data:
                self._drop(key)
                raise ChunkError(
                    f"payload {chunk.payload_id}: two different chunks at index {chunk.index}",
                    device=source,
                )
            return None
        if part.held + len(chunk.data) > part.total_size:
            self._drop(key)
            raise ChunkError(
                f"payload {chunk.payload_id}: chunks add up to more than {part.total_size} bytes",
                device=source,
            )
        if self.held_bytes + len(chunk.data) > self.max_total_bytes:
            self._drop(key)
            raise ChunkError(
                f"reassembly buffer full ({self.max_total_bytes} bytes); "
                f"dropped {chunk.payload_id}",
                device=source,
            )
        part.parts[chunk.index] = chunk.data
        part.held += len(chunk.data)
        part.wire_bytes += wire_bytes
        self.held_bytes += len(chunk.data)
        if len(part.parts) < part.count:
            return None
        self._drop(key)
        payload = b"".join(part.parts[i] for i in range(part.count))
        if len(payload) != part.total_size or hashlib.sha256(payload).digest() != part.digest:
            raise ChunkError(
                f"payload {chunk.payload_id}: reassembled bytes fail the sha256 check",
                device=source,
            )
        return Completed(key=key, payload=payload, chunks=part.count, wire_bytes=part.wire_bytes)

    def expire(self, now: float) -> list[tuple[str, str]]:
        """Drop payloads older than max_age_s (counted in `expired`); return their keys."""
        old = [k for k, p in self._open.items() if now - p.first_seen > self.max_age_s]
        for k in old:
            self._drop(k)
        self.expired += len(old)
        return old

    def _drop(self, key: tuple[str, str]) -> None:
        part = self._open.pop(key, None)
        if part is not None:
            self.held_bytes -= part.held
