"""The update builder: budget fitting, the residual carried, one encoding that decodes back."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from edge_agent.updates import BuiltUpdate, NoUpdate, build_update, header_bytes, update_rng
from fedmq.codecs import decode_tensors, parse_pipeline, to_dense
from fedmq.wire import (
    RoundAnnouncement,
    TrainConfig,
    Update,
    decode_update,
    encode_update,
    specs_of,
)


def announce(codec: str = "float32", max_update_bytes: int = 0) -> RoundAnnouncement:
    return RoundAnnouncement(job="j", round_id=7, model_version=3, state="open", opened_at=0.0,
                             deadline=1e12, selected=("d1",), target=1, min_devices=1,
                             train=TrainConfig(), codec=codec,
                             max_update_bytes=max_update_bytes)  # fmt: skip


def weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=(200, 50)).astype(np.float32),
            "b": rng.normal(size=50).astype(np.float32)}  # fmt: skip


BASE, TRAINED = weights(0), weights(1)


def build(r: RoundAnnouncement, residual: dict[str, np.ndarray] | None = None,
          profile_max_bytes: int = 0) -> BuiltUpdate | NoUpdate:  # fmt: skip
    return build_update(
        announcement=r, device="d1", update_id="u1", base=BASE, trained=TRAINED,
        residual=residual, profile_max_bytes=profile_max_bytes, num_examples=120,
        metrics={"train_loss": 0.5}, fetched_bytes=999, rng=update_rng(r.round_id, "d1"),
    )  # fmt: skip


def sent(built: BuiltUpdate) -> dict[str, np.ndarray]:
    u = decode_update(built.payload)
    decoded = decode_tensors(u.body, u.codec, specs_of(BASE))
    return {name: to_dense(t) for name, t in decoded.items()}


def test_the_payload_decodes_to_the_update_and_carries_the_delta() -> None:
    built = build(announce("float32"))
    assert isinstance(built, BuiltUpdate) and built.update_id == "u1"
    u = decode_update(built.payload)
    assert u == built.update
    assert (u.device, u.round_id, u.base_version, u.num_examples, u.fetched_bytes) == (
        "d1", 7, 3, 120, 999
    )  # fmt: skip
    assert u.codec == "float32" and u.metrics == {"train_loss": 0.5}
    for name in BASE:
        np.testing.assert_array_equal(sent(built)[name], TRAINED[name] - BASE[name])
    assert built.residual is None and built.budget == 0


def test_a_sparse_update_keeps_what_it_did_not_send_and_adds_it_next_time() -> None:
    first = build(announce("topk:0.1+float32"))
    assert isinstance(first, BuiltUpdate) and first.residual is not None
    for name in BASE:  # nothing is lost: sent + residual == delta
        np.testing.assert_allclose(sent(first)[name] + first.residual[name],
                                   TRAINED[name] - BASE[name], rtol=0, atol=1e-6)  # fmt: skip
    second = build(announce("topk:0.1+float32"), residual=first.residual)
    assert isinstance(second, BuiltUpdate) and second.residual is not None
    for name in BASE:
        np.testing.assert_allclose(
            sent(second)[name] + second.residual[name],
            TRAINED[name] - BASE[name] + first.residual[name], rtol=0, atol=1e-5,
        )  # fmt: skip
    assert not second.residual_reset


def test_a_residual_of_another_model_is_dropped_not_added() -> None:
    built = build(announce("topk:0.1+float32"), residual={"x": np.ones(3, np.float32)})
    assert isinstance(built, BuiltUpdate) and built.residual_reset
    fresh = build(announce("topk:0.1+float32"))
    assert isinstance(fresh, BuiltUpdate) and built.payload == fresh.payload


def test_the_payload_fits_the_smaller_of_the_rounds_and_the_profiles_budget() -> None:
    dense = build(announce("int8+zstd"))
    assert isinstance(dense, BuiltUpdate)
    for round_budget, profile_budget, budget in [(3000, 0, 3000), (3000, 2000, 2000),
                                                 (0, 2500, 2500)]:  # fmt: skip
        built = build(announce("int8+zstd", round_budget), profile_max_bytes=profile_budget)
        assert isinstance(built, BuiltUpdate) and built.budget == budget
        assert len(built.payload) <= budget < len(dense.payload)
        assert built.pipeline.sparse and built.update.codec == built.pipeline.name
        assert parse_pipeline(decode_update(built.payload).codec) == built.pipeline
        assert built.residual is not None  # what the budget left out is kept


def test_a_budget_even_one_value_per_tensor_cannot_meet_is_a_reason_not_an_update() -> None:
    tiny = build(announce("int8+zstd", 300))
    assert isinstance(tiny, NoUpdate) and "300-byte budget" in tiny.reason
    header_only = build(announce("float32", 100))
    assert isinstance(header_only, NoUpdate) and "100-byte budget" in header_only.reason


def test_the_header_allowance_covers_any_codec_name_the_budget_chooses() -> None:
    u = Update(update_id="u" * 32, device="d", round_id=1, base_version=0, num_examples=1,
               codec="", body=b"", metrics={"train_loss": 1.0})  # fmt: skip
    allowance = header_bytes(u, parse_pipeline("int8:4096+zstd"))
    for fraction in (1e-6, 0.000123457, 0.5, 1.0):
        name = parse_pipeline(f"topk:{fraction}+int8:4096+zstd").name
        body = b"x" * 70_000  # a bin 32 body
        assert len(encode_update(replace(u, codec=name, body=body))) <= allowance + len(body)
