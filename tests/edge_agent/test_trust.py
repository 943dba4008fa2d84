"""Attacks on the downlink, judged by the pure parts that face them: the fetch machine for
manifests (training and inference-only devices) and the round gate. No broker, no torch."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.fetch import Action, Hold, HoldOnnx, ModelFetch, Reject, Subscribe
from edge_agent.trust import DownlinkTrust, RoundGate
from fedmq.signing import Signer
from fedmq.topics import Topics
from fedmq.wire import (
    Manifest,
    PayloadRef,
    RoundAnnouncement,
    TrainConfig,
    decode_manifest,
    decode_round,
    encode_manifest,
    encode_round,
    specs_of,
)
from tests.edge_agent.versions import Version, make_version, small_weights

TOPICS = Topics(job="j", prefix="p")
KEY = Ed25519PrivateKey.generate()  # the aggregator's
OUTSIDER = Ed25519PrivateKey.generate()
PINNED = DownlinkTrust(server_key=KEY.public_key())


def signed(m: Manifest, key: Ed25519PrivateKey = KEY, topic: str = "") -> Manifest:
    """m as a device decodes it after the aggregator (or whoever holds key) signed it."""
    sign = Signer(key=key).for_topic(topic or TOPICS.global_manifest())
    return decode_manifest(encode_manifest(m, sign=sign))


def machine(trust: DownlinkTrust = PINNED, **kw: object) -> ModelFetch:
    kw.setdefault("specs", specs_of(small_weights()))
    return ModelFetch(topics=TOPICS, task="t", trust=trust, **kw)  # type: ignore[arg-type]


def fetch(f: ModelFetch, m: Manifest, v: Version, onnx: bool = False) -> list[Action]:
    out = f.on_manifest(m, now=0.0)
    if any(isinstance(a, Subscribe) for a in out):
        for c in v.onnx if onnx else v.full:
            out += f.on_chunk(c, now=1.0)
    return out


def refused(actions: list[Action]) -> str:
    """The code of the one final refusal in actions; fails when anything was subscribed."""
    assert not any(isinstance(a, (Subscribe, Hold, HoldOnnx)) for a in actions), actions
    (r,) = [a for a in actions if isinstance(a, Reject)]
    assert isinstance(r, Reject) and r.final
    return r.code


def holding(version: int = 0, epoch: int = 0, trust: DownlinkTrust = PINNED) -> ModelFetch:
    f, v = machine(trust), make_version(small_weights(version), version)
    m = dataclasses.replace(v.manifest, epoch=epoch)
    assert any(isinstance(a, Hold) for a in fetch(f, signed(m), v))
    assert (f.version, f.epoch) == (version, epoch if trust.server_key else 0)
    return f


def test_a_signed_manifest_is_fetched_and_held() -> None:
    f, v = machine(), make_version(small_weights(), 0)
    actions = fetch(f, signed(v.manifest), v)
    (sub,) = [a for a in actions if isinstance(a, Subscribe)]
    assert isinstance(sub, Subscribe) and sub.verified
    assert any(isinstance(a, Hold) for a in actions) and f.version == 0


def test_a_forged_manifest_with_matching_digests_is_refused_unsigned_or_badly_signed() -> None:
    f = holding(0)
    forged = make_version(small_weights(seed=66), 1)  # the attacker's own model and chunks
    assert refused(fetch(f, forged.manifest, forged)) == "unsigned"
    assert refused(fetch(f, signed(forged.manifest, OUTSIDER), forged)) == "bad_signature"
    # the aggregator's signature moved onto other content, or onto this job's other topic
    real = signed(make_version(small_weights(1), 1).manifest)
    assert real.sig is not None
    moved = dataclasses.replace(forged.manifest, sig=dataclasses.replace(
        real.sig, covered=signed(forged.manifest, OUTSIDER).sig.covered))  # type: ignore[union-attr]  # fmt: skip
    assert refused(fetch(f, moved, forged)) == "bad_signature"
    assert refused(fetch(f, signed(forged.manifest, topic=TOPICS.round()), forged)) == (
        "bad_signature")  # fmt: skip
    assert f.version == 0 and f.fetching is None  # the held model stays


def test_an_inference_only_device_verifies_the_same_way() -> None:
    f = machine(specs=None, onnx=True)
    v = make_version(small_weights(), 0, onnx=b"onnx-bytes" * 300)
    assert refused(fetch(f, v.manifest, v, onnx=True)) == "unsigned"
    assert refused(fetch(f, signed(v.manifest, OUTSIDER), v, onnx=True)) == "bad_signature"
    assert any(isinstance(a, HoldOnnx) for a in fetch(f, signed(v.manifest), v, onnx=True))


def test_a_foreign_job_or_task_is_refused_even_when_signed() -> None:
    f = holding(0)
    v = make_version(small_weights(1), 1)
    # another job's aggregator: its manifest on its own topic does not verify here
    theirs = signed(dataclasses.replace(v.manifest, job="k"), topic="p/k/global")
    assert refused(fetch(f, theirs, v)) == "bad_signature"
    assert refused(fetch(f, signed(dataclasses.replace(v.manifest, job="k")), v)) == "wrong_job"
    assert refused(fetch(f, signed(dataclasses.replace(v.manifest, task="u")), v)) == "wrong_task"


def test_replays_and_backwards_versions_are_refused_by_epoch_then_version() -> None:
    f = holding(3, epoch=5)
    old = make_version(small_weights(2), 2)
    assert refused(fetch(f, signed(dataclasses.replace(old.manifest, epoch=5)), old)) == (
        "stale_version")  # fmt: skip
    newer = make_version(small_weights(9), 9)
    assert refused(fetch(f, signed(dataclasses.replace(newer.manifest, epoch=4)), newer)) == (
        "stale_version")  # an earlier epoch, whatever its version  # fmt: skip
    # an aggregator that started over (newer epoch) is followed from its version 0 on
    fresh = make_version(small_weights(7), 0)
    actions = fetch(f, signed(dataclasses.replace(fresh.manifest, epoch=6)), fresh)
    assert any(isinstance(a, Hold) for a in actions) and (f.version, f.epoch) == (0, 6)


def test_version_999999_does_not_freeze_a_device() -> None:
    huge = make_version(small_weights(5), 999_999)
    f = holding(3, epoch=5)
    assert refused(fetch(f, huge.manifest, huge)) == "unsigned"
    # without a pinned key (insecure) the jump policy refuses it instead
    loose = holding(3, trust=DownlinkTrust(insecure=True))
    assert refused(fetch(loose, huge.manifest, huge)) == "version_jump"
    for device in (f, loose):  # and the real next version is still taken
        nxt = make_version(small_weights(4), 4)
        assert any(isinstance(a, Hold) for a in fetch(device, signed(dataclasses.replace(
            nxt.manifest, epoch=5)), nxt))  # fmt: skip
        assert device.version == 4


@pytest.mark.parametrize("chunks", [1_000_000, 60_000, 3])
def test_chunk_counts_beyond_what_the_size_implies_are_refused(chunks: int) -> None:
    f = holding(0)
    v = make_version(small_weights(1), 1)
    ref = PayloadRef(payload_id="w1", size=1000, sha256="0" * 64, chunks=chunks, first_index=0)
    m = signed(dataclasses.replace(v.manifest, weights=ref))  # even the aggregator's own
    assert refused(fetch(f, m, v)) == "bad_manifest"
    assert f.version == 0


def test_chunks_that_claim_another_count_are_ignored() -> None:
    f = holding(0)
    v = make_version(small_weights(1), 1)
    f.on_manifest(signed(v.manifest), now=0.0)
    liars = [dataclasses.replace(c, count=60_000) for c in v.full]
    assert [a for c in liars for a in f.on_chunk(c, now=1.0)] == []
    assert any(isinstance(a, Hold) for c in v.full for a in f.on_chunk(c, now=1.0))


def test_insecure_accepts_unsigned_but_never_a_bad_signature() -> None:
    f = machine(DownlinkTrust(server_key=KEY.public_key(), insecure=True))
    v = make_version(small_weights(), 0)
    assert refused(fetch(f, signed(v.manifest, OUTSIDER), v)) == "bad_signature"
    actions = fetch(f, v.manifest, v)
    assert not [a for a in actions if isinstance(a, Subscribe) and a.verified]
    assert any(isinstance(a, Hold) for a in actions)


# ---------------------------------------------------------------- rounds


def announcement(round_id: int = 4, state: str = "open", epoch: int = 5,
                 **kw: object) -> RoundAnnouncement:  # fmt: skip
    fields = dict(job="j", round_id=round_id, model_version=3, state=state, opened_at=0.0,
                  deadline=30.0, selected=("d1",), target=1, min_devices=1,
                  train=TrainConfig(1, 10, 0.05), task="t", epoch=epoch)  # fmt: skip
    return RoundAnnouncement(**{**fields, **kw})  # type: ignore[arg-type]


def signed_round(r: RoundAnnouncement, key: Ed25519PrivateKey = KEY) -> RoundAnnouncement:
    return decode_round(encode_round(r, sign=Signer(key=key).for_topic(TOPICS.round())))


def gate(trust: DownlinkTrust = PINNED) -> RoundGate:
    return RoundGate(topics=TOPICS, task="t", trust=trust, max_epochs=20, max_lr=1.0)


def code(g: RoundGate, r: RoundAnnouncement) -> str:
    _, refusal = g.check(r)
    return refusal.code if refusal else ""


def test_a_forged_round_with_absurd_training_is_refused() -> None:
    g = gate()
    absurd = announcement(train=TrainConfig(epochs=1000, batch_size=10, lr=99.0))
    assert code(g, absurd) == "unsigned"
    assert code(g, signed_round(absurd, OUTSIDER)) == "bad_signature"
    # the profile bounds what a device does even for its own aggregator (a misconfiguration)
    assert code(g, signed_round(absurd)) == "train_limits"
    assert code(gate(DownlinkTrust()), absurd) == "train_limits"
    assert code(g, signed_round(announcement())) == ""


def test_fedprox_mu_beyond_the_profile_is_refused_and_a_forged_mu_never_verifies() -> None:
    def prox(mu: float, lr: float = 0.05) -> RoundAnnouncement:
        return announcement(train=TrainConfig(1, 10, lr, prox_mu=mu))

    g = RoundGate(topics=TOPICS, task="t", trust=PINNED, max_epochs=20, max_lr=1.0,
                  max_prox_mu=10.0)  # fmt: skip
    assert code(g, signed_round(prox(0.1))) == ""
    assert code(g, signed_round(prox(50.0))) == "train_limits"  # beyond the profile
    assert code(g, signed_round(prox(5.0, lr=0.5))) == "train_limits"  # mu x lr >= 1
    assert code(gate(), signed_round(prox(0.1))) == "train_limits"  # a gate without FedProx
    # mu is covered by the signature: set, or changed, after signing, it does not verify
    for r, mu in ((announcement(), 5.0), (prox(0.1), 9.0)):
        raw = msgpack.unpackb(encode_round(r, sign=Signer(key=KEY).for_topic(TOPICS.round())))
        raw["train"]["prox_mu"] = mu
        assert code(g, decode_round(msgpack.packb(raw))) == "bad_signature"


def test_rounds_only_move_forward_within_an_epoch() -> None:
    g = gate()
    r4, r4_closed = signed_round(announcement(4)), signed_round(announcement(4, "closed"))
    assert code(g, r4) == "" and code(g, r4_closed) == "" and code(g, r4_closed) == ""
    assert code(g, r4) == "stale_round"  # a replay of the open round once it closed
    assert code(g, signed_round(announcement(3))) == "stale_round"
    assert code(g, signed_round(announcement(9, epoch=4))) == "stale_round"
    assert code(g, signed_round(announcement(1, epoch=6))) == ""  # the aggregator started over
    assert g.last == (6, 1, 0)


def test_a_round_of_another_job_or_task_is_refused() -> None:
    g = gate()
    assert code(g, signed_round(announcement(job="k"))) == "wrong_job"
    assert code(g, signed_round(announcement(task="u"))) == "wrong_task"
