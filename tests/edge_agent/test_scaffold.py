"""SCAFFOLD on the device: the corrected local step, c_i and the held c across an agent
restart, and the fetch of a version's control payload (signed with its manifest)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge_agent.fetch import Hold, HoldControl, ModelFetch, Reject
from edge_agent.scaffold import LOCAL_FILE, SERVER_FILE, DeviceControl
from edge_agent.state import DeviceStore
from edge_agent.training import Budget, train_local
from fedmq.chunks import split_payload
from fedmq.topics import Topics
from fedmq.wire import PayloadRef, RoundAnnouncement, TrainConfig, encode_weights, specs_of
from tests.edge_agent.versions import LIMIT, make_version, small_weights


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def test_the_correction_shifts_every_step_by_minus_lr_times_c_minus_ci() -> None:
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    y = np.array([0, 1] * 4)
    config = TrainConfig(epochs=1, batch_size=8, lr=0.1)  # one step: the whole batch
    plain, corrected = _linear(), _linear()
    corr = {"weight": np.full((2, 3), 0.5, np.float32), "bias": np.array([1.0, -2.0], np.float32)}
    r = train_local(plain, x, y, config=config, budget=Budget(), seed=3)
    rc = train_local(corrected, x, y, config=config, budget=Budget(), seed=3, correction=corr)
    assert r.steps == rc.steps == 1
    for (name, p), q in zip(plain.named_parameters(), corrected.parameters(), strict=True):
        np.testing.assert_allclose(q.detach().numpy() - p.detach().numpy(), -0.1 * corr[name],
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
    # a zero correction is plain SGD bit for bit
    again = _linear()
    zero = {k: np.zeros_like(v) for k, v in corr.items()}
    train_local(again, x, y, config=config, budget=Budget(), seed=3, correction=zero)
    for p, q in zip(plain.parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q)


def _round(version: int) -> RoundAnnouncement:
    return RoundAnnouncement(job="j", round_id=version + 1, model_version=version, state="open",
                             opened_at=0.0, deadline=1.0, selected=("d",), target=1,
                             min_devices=1, train=TrainConfig(lr=0.1, correction="scaffold"))


def test_ci_and_the_held_c_survive_an_agent_restart(tmp_path: Path) -> None:
    w = small_weights()
    specs = specs_of(w)
    store = DeviceStore(root=tmp_path)
    first = DeviceControl(store=store, specs=specs, progress={})
    assert not first.ready(_round(4)) and first.correction(_round(4)) is None
    c = {k: np.full(v.shape, 0.25, np.float32) for k, v in w.items()}
    assert first.took(HoldControl(4, c, encode_weights(c), 100))
    assert first.ready(_round(4)) and not first.ready(_round(5))
    corr = first.correction(_round(4))
    assert corr is not None and np.all(corr["w"] == 0.25)  # c - c_i with c_i = 0
    trained = {k: v + 0.01 for k, v in w.items()}
    _, _, c_new = first.attach(_round(4), w, trained, steps=2)
    first.commit(c_new)
    # a restart: the progress says which version's c is held
    second = DeviceControl(store=DeviceStore(root=tmp_path), specs=specs,
                           progress={"control_version": 4})  # fmt: skip
    assert second.ready(_round(4))
    assert second.local is not None
    for k in w:
        np.testing.assert_array_equal(second.local[k], c_new[k])
    # a c_i file that does not fit this model starts c_i again at zero (not fatal)
    (tmp_path / LOCAL_FILE).write_bytes(b"torn")
    (tmp_path / SERVER_FILE).write_bytes(encode_weights({"w": np.zeros(3, np.float32)}))
    third = DeviceControl(store=DeviceStore(root=tmp_path), specs=specs,
                          progress={"control_version": 4})  # fmt: skip
    assert third.local is None and not third.ready(_round(4))


def _with_control(control: dict[str, np.ndarray]):  # type: ignore[no-untyped-def]
    v = make_version(small_weights(), 3)
    body = encode_weights(control)
    first = v.manifest.weights.chunks
    chunks = split_payload(body, "c3", LIMIT)
    ref = PayloadRef(payload_id="c3", size=len(body), sha256=hashlib.sha256(body).hexdigest(),
                     chunks=len(chunks), first_index=first)  # fmt: skip
    return v, dataclasses.replace(v.manifest, control=ref), chunks


def test_the_control_payload_is_fetched_after_the_weights_and_checked() -> None:
    c = {k: np.full(a.shape, 0.5, np.float32) for k, a in small_weights().items()}
    v, manifest, chunks = _with_control(c)
    f = ModelFetch(topics=Topics(job="j", prefix="p"), task="t", specs=specs_of(c))
    f.on_manifest(manifest, now=0.0)
    held = [a for ch in v.full for a in f.on_chunk(ch, now=1.0)]
    assert any(isinstance(a, Hold) for a in held)
    assert f.fetching == manifest  # now the control payload
    done = [a for ch in chunks for a in f.on_chunk(ch, now=1.0)]
    (hc,) = [a for a in done if isinstance(a, HoldControl)]
    assert hc.version == 3 and np.all(hc.control["w"] == 0.5) and f.control_version == 3
    # a restarted device that holds the version but not its c fetches only the control
    g = ModelFetch(topics=Topics(job="j", prefix="p"), task="t", specs=specs_of(c), version=3,
                   sha256=manifest.model_sha256, weights=v.weights)  # fmt: skip
    (sub,) = g.on_manifest(manifest, now=0.0)
    assert sub.what == "control"  # type: ignore[union-attr]
    # a control payload with the right digest but not this model's tensors is refused
    bad = {"w": np.zeros(3, np.float32)}
    v2, m2, chunks2 = _with_control(bad)
    h = ModelFetch(topics=Topics(job="j", prefix="p"), task="t", specs=specs_of(c), version=3,
                   sha256=m2.model_sha256, weights=v2.weights)  # fmt: skip
    h.on_manifest(m2, now=0.0)
    out = [a for ch in chunks2 for a in h.on_chunk(ch, now=1.0)]
    assert [a.code for a in out if isinstance(a, Reject)] == ["bad_payload"]
    assert h.control_version == -1
