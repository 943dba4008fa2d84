"""Chunking: sizes fit the limit, any order with duplicates reassembles, bounds hold."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.chunks import Reassembler, encode_chunks, split_payload
from fedmq.errors import ChunkError
from fedmq.wire import Chunk, decode_chunk


@settings(max_examples=150)
@given(
    payload=st.binary(max_size=20_000),
    limit=st.integers(1024, 6000),
    data=st.data(),
)
def test_any_order_with_duplicates_reassembles(payload: bytes, limit: int, data) -> None:  # noqa: ANN001
    wire = encode_chunks(payload, "p1", limit)
    assert all(len(w) <= limit for w in wire)
    order = data.draw(st.permutations(wire))
    extra = data.draw(st.lists(st.sampled_from(wire), max_size=5))
    r = Reassembler()
    results = [r.add(decode_chunk(w), source="d", now=0.0) for w in [*order, *extra][: len(wire)]]
    # feed the permutation fully first, then duplicates
    r2 = Reassembler()
    done = [x for x in (r2.add(decode_chunk(w), source="d", now=0.0) for w in order) if x]
    assert len(done) == 1 and done[0].payload == payload and done[0].chunks == len(wire)
    del results


@given(payload=st.binary(min_size=1, max_size=5000), data=st.data())
def test_duplicates_interleaved_before_completion(payload: bytes, data) -> None:  # noqa: ANN001
    wire = encode_chunks(payload, "p", 1024)
    stream = data.draw(st.permutations(wire + wire[: len(wire) // 2]))
    r = Reassembler()
    out = [x for x in (r.add(decode_chunk(w), source="d", now=0.0) for w in stream) if x]
    assert [c.payload for c in out][:1] == [payload]


def test_sources_do_not_mix() -> None:
    a, b = b"a" * 3000, b"b" * 3000
    r = Reassembler()
    ca, cb = split_payload(a, "same", 1024), split_payload(b, "same", 1024)
    got = []
    for x, y in zip(ca, cb, strict=True):
        got += [r.add(x, source="dev-a", now=0), r.add(y, source="dev-b", now=0)]
    assert sorted(c.payload for c in got if c) == [a, b]


def test_digest_mismatch_is_rejected() -> None:
    chunks = split_payload(b"x" * 3000, "p", 1024)
    forged = Chunk("p", 1, chunks[1].count, chunks[1].total_size, chunks[1].digest,
                   b"y" * len(chunks[1].data))  # fmt: skip
    r = Reassembler()
    r.add(chunks[0], source="d", now=0)
    r.add(forged, source="d", now=0)
    with pytest.raises(ChunkError, match="sha256"):
        for c in chunks[2:]:
            r.add(c, source="d", now=0)
    assert r.held_bytes == 0 and r.open_payloads == 0


def test_conflicting_duplicate_is_rejected() -> None:
    chunks = split_payload(b"x" * 3000, "p", 1024)
    r = Reassembler()
    r.add(chunks[0], source="d", now=0)
    other = Chunk("p", 0, chunks[0].count, chunks[0].total_size, chunks[0].digest, b"z")
    with pytest.raises(ChunkError, match="two different"):
        r.add(other, source="d", now=0)


def test_bounds_on_size_open_payloads_and_age() -> None:
    r = Reassembler(max_payload_bytes=2000, max_open=2, max_age_s=10)
    with pytest.raises(ChunkError, match="exceeds"):
        r.add(split_payload(b"x" * 3000, "big", 1024)[0], source="d", now=0)
    r.add(split_payload(b"x" * 1500, "p1", 1024)[0], source="d", now=0)
    r.add(split_payload(b"x" * 1500, "p2", 1024)[0], source="e", now=0)
    r.add(split_payload(b"x" * 1500, "p3", 1024)[0], source="d", now=1)  # p1 gives way
    assert r.open_payloads == 2 and r.evicted == 1 and r.held_by("d")[0] == 1
    assert r.expire(now=12) and r.open_payloads == 0 and r.held_bytes == 0
    assert r.add(split_payload(b"x" * 1500, "p3", 1024)[0], source="d", now=13) is None


def test_total_bytes_bound() -> None:
    r = Reassembler(max_total_bytes=1500)
    r.add(split_payload(b"x" * 3000, "p1", 1024)[0], source="d", now=0)
    r.add(split_payload(b"y" * 3000, "p2", 1024)[0], source="e", now=0)  # p1 gives way
    assert r.evicted == 1 and r.held_by("d") == (0, 0)
    tiny = Reassembler(max_total_bytes=500)  # nothing can give way to a chunk this large
    with pytest.raises(ChunkError, match="buffer full"):
        tiny.add(split_payload(b"y" * 3000, "p2", 1024)[0], source="d", now=0)
    assert tiny.held_bytes == 0 and tiny.open_payloads == 0


def _first_chunks(source_payloads: int, size: int, prefix: str) -> list[Chunk]:
    return [split_payload(bytes([i % 251]) * size, f"{prefix}{i}", 1024)[0]
            for i in range(source_payloads)]  # fmt: skip


def test_a_device_flooding_partial_payloads_cannot_starve_the_others() -> None:
    """The attack: 256 never-completed payloads (24 KB in all) from one device used to make
    the reassembler refuse every other device's update until they expired (600 s)."""
    r = Reassembler()
    honest = split_payload(b"h" * 3000, "honest", 1024)
    assert r.add(honest[0], source="d", now=0.0) is None  # started before the flood
    for c in _first_chunks(1000, 100 * 2, "m"):  # 2 chunks each at this limit; one is sent
        c = Chunk(c.payload_id, 0, 2, c.total_size, c.digest, c.data[:100])
        r.add(c, source="mallory", now=1.0)
    assert r.held_by("mallory")[0] == r.max_open_per_source  # it only evicts its own
    late = split_payload(b"z" * 3000, "other", 1024)  # a device starting after the flood
    done = [r.add(c, source=src, now=2.0) for src, c in
            [*(("d", c) for c in honest[1:]), *(("e", c) for c in late)]]  # fmt: skip
    assert [x.payload for x in done if x] == [b"h" * 3000, b"z" * 3000]


def test_a_device_flooding_bytes_cannot_starve_the_others() -> None:
    r = Reassembler(max_payload_bytes=8000, max_total_bytes=12_000)
    honest = split_payload(b"h" * 5000, "honest", 1024)
    r.add(honest[0], source="d", now=0.0)
    for c in _first_chunks(200, 7000, "m"):
        r.add(c, source="mallory", now=1.0)
    assert r.held_by("mallory")[1] <= r.max_bytes_per_source
    done = [r.add(c, source="d", now=2.0) for c in honest[1:]]
    assert done[-1] is not None and done[-1].payload == b"h" * 5000


def test_empty_payload_is_one_chunk() -> None:
    (c,) = split_payload(b"", "e", 1024)
    assert c.count == 1 and c.digest == hashlib.sha256(b"").digest()
    assert Reassembler().add(c, source="d", now=0).payload == b""


def test_limit_too_small() -> None:
    with pytest.raises(ValueError, match="at least"):
        split_payload(b"x", "p", 100)
