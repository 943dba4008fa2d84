"""Split payloads into chunks that fit the broker's limit, and put them back together.

Pure code: no sockets, no clock (time comes in as `now`). Reassembly accepts chunks in
any order and duplicates, verifies the sha256 of the whole payload, and is bounded in
bytes held, open payloads and age, so a peer that sends half a payload costs nothing
for long.
"""

from __future__ import annotations

import hashlib
from collections import Counter
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
    """Collects chunks per (source, payload id) until a payload is whole.

    Every pool is bounded per source as well as in all, so one source (a device flooding
    never-completed payloads) cannot starve the others: a source over its own quota of
    open payloads or bytes loses its own oldest partial payloads; when the shared pools
    are full, the source holding the most gives way first. Payloads dropped to make room
    are counted in `evicted`, those dropped for their age in `expired`.
    """

    def __init__(
        self,
        *,
        max_payload_bytes: int = 64 * 1024 * 1024,
        max_open: int = 256,
        max_total_bytes: int = 256 * 1024 * 1024,
        max_chunks: int = 65536,
        max_age_s: float = 600.0,
        max_open_per_source: int = 4,
        max_bytes_per_source: int = 0,  # 0: max_payload_bytes
    ) -> None:
        bounds = (max_payload_bytes, max_open, max_total_bytes, max_chunks, max_open_per_source)
        if min(bounds) <= 0 or max_age_s <= 0 or max_bytes_per_source < 0:
            raise ValueError("reassembly bounds must all be positive")
        self.max_payload_bytes = max_payload_bytes
        self.max_open = max_open
        self.max_total_bytes = max_total_bytes
        self.max_chunks = max_chunks
        self.max_age_s = max_age_s
        self.max_open_per_source = max_open_per_source
        self.max_bytes_per_source = max_bytes_per_source or max_payload_bytes
        self._open: dict[tuple[str, str], _Partial] = {}  # oldest first
        self._source_open: Counter[str] = Counter()
        self._source_bytes: Counter[str] = Counter()
        self.held_bytes = 0
        self.expired = 0
        self.evicted = 0

    @property
    def open_payloads(self) -> int:
        return len(self._open)

    def held_by(self, source: str) -> tuple[int, int]:
        """(open payloads, bytes held) of one source."""
        return self._source_open[source], self._source_bytes[source]

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
        if not 0 <= chunk.index < chunk.count or chunk.total_size < 0:  # decode_chunk checks
            raise ChunkError(f"payload {chunk.payload_id}: chunk {chunk.index} of {chunk.count}"
                             f" for {chunk.total_size} bytes", device=source)  # fmt: skip
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
            self._make_room_for_payload(source)
            part = _Partial(chunk.count, chunk.total_size, chunk.digest, now)
            self._open[key] = part
            self._source_open[source] += 1
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
        if not self._make_room_for_bytes(key, len(chunk.data)):
            self._drop(key)
            raise ChunkError(
                f"reassembly buffer full ({self.max_total_bytes} bytes, "
                f"{self.max_bytes_per_source} per device); dropped {chunk.payload_id}",
                device=source,
            )
        part.parts[chunk.index] = chunk.data
        part.held += len(chunk.data)
        part.wire_bytes += wire_bytes
        self.held_bytes += len(chunk.data)
        self._source_bytes[source] += len(chunk.data)
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

    def _make_room_for_payload(self, source: str) -> None:
        """Before a new payload of source opens: within its own quota, then the shared one."""
        while self._source_open[source] >= self.max_open_per_source:
            self._evict(self._oldest_of(source))
        while len(self._open) >= self.max_open:
            self._evict(self._oldest_of(max(self._source_open, key=self._source_open.__getitem__)))

    def _make_room_for_bytes(self, key: tuple[str, str], n: int) -> bool:
        """Room for n more bytes of payload key; other payloads give way (its source's own
        first, then the biggest holder's). False when even that is not enough."""
        source = key[0]
        while self._source_bytes[source] + n > self.max_bytes_per_source:
            older = self._oldest_of(source, besides=key)
            if older is None:
                return False
            self._evict(older)
        while self.held_bytes + n > self.max_total_bytes:
            holders = [s for s in self._source_bytes if self._oldest_of(s, besides=key)]
            if not holders:
                return False
            biggest = max(holders, key=self._source_bytes.__getitem__)
            self._evict(self._oldest_of(biggest, besides=key))
        return True

    def _oldest_of(
        self, source: str, besides: tuple[str, str] | None = None
    ) -> tuple[str, str] | None:
        return next((k for k in self._open if k[0] == source and k != besides), None)

    def _evict(self, key: tuple[str, str] | None) -> None:
        if key is not None:
            self._drop(key)
            self.evicted += 1

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
            source = key[0]
            self._source_open[source] -= 1
            self._source_bytes[source] -= part.held
            if self._source_open[source] <= 0:
                del self._source_open[source]
                self._source_bytes.pop(source, None)
