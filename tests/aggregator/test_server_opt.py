"""Server optimisers against hand-computed references, and their state across versions.

Pure: no broker, no torch. The references below were worked out by hand (scalar
arithmetic, one coordinate at a time) from Reddi et al.'s Algorithm 2 with b1 = 0.5,
b2 = 0.75, tau = 0.5 (so v starts at tau^2 = 0.25) and lr = 0.5, on the deltas
d1 = (2, -4 | 1) and d2 = (1, 4 | -1) from w0 = (1, -2 | 0.5), where "w" is float64 and
"b" float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator.fedavg import ServerSGD, apply_delta
from aggregator.globals import ModelRefused
from aggregator.server_opt import FedOpt, encode_opt_state, fresh_state, make_server_optimizer
from aggregator.settings import AggregatorSettings
from aggregator.store import Store
from fedmq.wire import TensorSpec, encode_weights, specs_of

W0 = {"w": np.array([1.0, -2.0]), "b": np.array([0.5], dtype=np.float32)}
D1 = {"w": np.array([2.0, -4.0]), "b": np.array([1.0])}
D2 = {"w": np.array([1.0, 4.0]), "b": np.array([-1.0])}
SPECS = specs_of(W0)
HP = {"lr": 0.5, "momentum": 0.5, "beta2": 0.75, "tau": 0.5}

# weights after step 1 and step 2 ("w" then "b"), by hand
EXPECTED = {
    # m = b1 m + d; w += lr m:  m1 = (2, -4 | 1), m2 = (2, 2 | -0.5)
    "avgm": ([2.0, -4.0, 1.0], [3.0, -3.0, 0.75]),
    # m = b1 m + (1 - b1) d = (1, -2 | 0.5), then (1, 1 | -0.25)
    # v = b2 v + (1 - b2) d^2 = (1.1875, 4.1875 | 0.4375), then (1.140625, 7.140625 | 0.578125)
    # w += lr m / (sqrt(v) + tau), e.g. 1 + 0.5 * 1 / (sqrt(1.1875) + 0.5) = 1.31451985913...
    "adam": ([1.3145198591387564, -2.3927208109125364, 0.7152504370215302],
             [1.633397314950513, -2.2351012342555574, 0.6160712689120912]),
    # v = v - (1 - b2) d^2 sign(v - d^2): (1.25, 4.25 | 0.5), then (1.0, 8.25 | 0.75); the
    # first coordinate's v shrinks in step 2 (v = 1.25 > d^2 = 1): Yogi's additive decrease
    "yogi": ([1.3090169943749475, -2.3903882032022077, 0.7071067811865476],
             [1.6423503277082807, -2.2421206204978943, 0.6156004302404379]),
    # v = v + d^2: (4.25, 16.25 | 1.25), then (5.25, 32.25 | 2.25)
    "adagrad": ([1.1951941016011038, -2.2206955546343297, 0.6545084971874737],
                [1.3743228863488959, -2.1397751117312005, 0.5920084971874737]),
}  # fmt: skip


def _opt(kind: str, store: Store | None = None, **hp: float) -> FedOpt:
    return FedOpt(kind=kind, specs=SPECS, store=store, **{**HP, **hp})  # type: ignore[arg-type]


def _flat(w: dict[str, np.ndarray]) -> list[float]:
    return [*w["w"].tolist(), *w["b"].tolist()]


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_two_steps_match_the_hand_computed_reference(kind: str) -> None:
    opt = _opt(kind)
    w1 = opt.step(W0, D1)
    opt.commit(1)
    w2 = opt.step(w1, D2)
    opt.commit(2)
    for got, want in zip((w1, w2), EXPECTED[kind], strict=True):
        assert got["w"].dtype == np.float64 and got["b"].dtype == np.float32  # dtypes kept
        np.testing.assert_allclose(got["w"], want[:2], rtol=1e-15)
        np.testing.assert_allclose(got["b"], np.float32(want[2]), rtol=1e-6)
    assert opt.state.step == 2


def test_sgd_is_the_old_server_sgd_bit_for_bit() -> None:
    s = AggregatorSettings(insecure=True)
    opt = make_server_optimizer(s, SPECS)
    assert isinstance(opt, ServerSGD) and opt.lr == 1.0  # server_lr 0: sgd's default, 1
    rng = np.random.default_rng(0)
    w = {"a": rng.normal(size=(5, 3)).astype(np.float32), "c": rng.normal(size=4)}
    d = {k: rng.normal(size=v.shape) for k, v in w.items()}
    old = {k: (v + 1.0 * d[k]).astype(v.dtype) for k, v in w.items()}  # FedAvg before issue 12
    new = opt.step(w, d)
    assert all(new[k].tobytes() == old[k].tobytes() for k in w)
    assert all(apply_delta(w, d)[k].tobytes() == old[k].tobytes() for k in w)
    # FedAvgM with no momentum and lr 1 is that same FedAvg, bit for bit
    avgm = FedOpt(kind="avgm", specs=specs_of(w), lr=1.0, momentum=0.0)
    for _ in range(2):
        assert all(avgm.step(w, d)[k].tobytes() == old[k].tobytes() for k in w)
        avgm.commit(1)


def test_defaults_follow_the_settings() -> None:
    def made(**kw: object) -> FedOpt:
        opt = make_server_optimizer(AggregatorSettings(insecure=True, **kw), SPECS)  # type: ignore[arg-type]
        assert isinstance(opt, FedOpt)
        return opt

    assert made(server_optimizer="adam").lr == 0.01
    assert made(server_optimizer="yogi").lr == 0.01
    assert made(server_optimizer="adagrad").lr == 0.1
    assert made(server_optimizer="avgm").lr == 1.0
    adam = made(server_optimizer="adam", server_lr=0.3, server_beta2=0.9, server_tau=1e-2)
    assert (adam.lr, adam.b1, adam.b2, adam.tau) == (0.3, 0.9, 0.9, 1e-2)
    np.testing.assert_array_equal(adam.state.v["w"], [1e-4, 1e-4])  # v_-1 = tau^2


@pytest.mark.parametrize("bad", [
    {"server_optimizer": "lamb"}, {"server_lr": -1.0}, {"server_momentum": 1.0},
    {"server_beta2": -0.1}, {"server_tau": 0.0}, {"prox_mu": -0.1},
    {"prox_mu": 20.0, "lr": 0.05},  # mu x lr = 1: every local step would overshoot
    {"prox_mu": 2000.0, "lr": 1e-4},  # beyond what a round message may carry
])  # fmt: skip
def test_settings_refuse_values_that_make_no_sense(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        AggregatorSettings(insecure=True, **bad)  # type: ignore[arg-type]


def test_a_step_changes_nothing_until_it_is_committed() -> None:
    opt = _opt("adam")
    first = opt.step(W0, D1)
    again = opt.step(W0, D1)  # a round closed again (refused, or re-closed): the same step
    assert all(first[k].tobytes() == again[k].tobytes() for k in W0)
    assert opt.state.step == 0
    opt.commit(1)
    assert opt.state.step == 1
    moved = opt.step(W0, D1)  # with the committed moments the same delta moves it otherwise
    assert moved["w"].tobytes() != first["w"].tobytes()


def test_a_state_that_would_not_be_finite_is_refused_and_changes_nothing() -> None:
    opt = _opt("adam")
    opt.step(W0, D1)
    opt.commit(1)
    before = encode_opt_state("adam", opt.state)
    with pytest.raises(ModelRefused):
        opt.step(W0, {"w": np.array([1e200, 0.0]), "b": np.array([0.0])})  # d^2 = inf
    assert opt.pending is None and encode_opt_state("adam", opt.state) == before


def test_the_state_round_trips_and_a_reclose_does_not_apply_the_step_twice(
    tmp_path: Path,
) -> None:
    store = Store(root=tmp_path)
    opt = _opt("yogi", store)
    w1 = opt.step(W0, D1)
    opt.commit(1)
    w2 = opt.step(w1, D2)
    opt.commit(2)
    assert (tmp_path / "versions" / "000001.opt").exists()
    # a crash while closing round 2 before state.json named version 2: the restart resumes
    # version 1's state and closes round 2 again, to the same weights and the same state
    again = _opt("yogi", store)
    assert again.resume(1, tmp_path / "quarantine") == 0
    assert again.state.step == 1
    w2_again = again.step(w1, D2)
    assert all(w2_again[k].tobytes() == w2[k].tobytes() for k in W0)
    again.commit(2)
    assert encode_opt_state("yogi", again.state) == encode_opt_state("yogi", opt.state)
    assert store.load_optimizer(2) == encode_opt_state("yogi", opt.state)


def _poisoned(kind: str) -> bytes:
    state = fresh_state(kind, SPECS, 0.5)
    state.v["w"][0] = -1.0  # a second moment below 0: sqrt would be nan
    return encode_opt_state(kind, state)


@pytest.mark.parametrize("blob", [
    b"", b"\x00" * 40, b"garbage that is not msgpack",
    encode_opt_state("adam", fresh_state("adam", SPECS, 0.5))[:-7],  # torn
    encode_opt_state("avgm", fresh_state("avgm", SPECS, 0.5)),  # another optimiser's
    _poisoned("adam"),
    encode_opt_state("adam", fresh_state("adam", (TensorSpec("w", "float64", (3,)),), 0.5)),
])  # fmt: skip
def test_a_state_file_that_cannot_be_trusted_is_quarantined_and_the_optimiser_starts_afresh(
    tmp_path: Path, blob: bytes
) -> None:
    store = Store(root=tmp_path)
    store.save_optimizer(4, blob)
    opt = _opt("adam", store)
    assert opt.resume(4, tmp_path / "quarantine") == 1
    assert not (tmp_path / "versions" / "000004.opt").exists()
    assert [p.read_bytes() for p in (tmp_path / "quarantine").iterdir()] == [blob]
    fresh = fresh_state("adam", SPECS, 0.5)
    assert encode_opt_state("adam", opt.state) == encode_opt_state("adam", fresh)


def test_a_missing_state_starts_afresh_without_quarantine(tmp_path: Path) -> None:
    opt = _opt("adagrad", Store(root=tmp_path))
    assert opt.resume(3, tmp_path / "quarantine") == 0  # e.g. version 3 was made by sgd
    assert opt.state.step == 0 and not (tmp_path / "quarantine").exists()


def test_state_files_are_pruned_and_quarantined_with_their_version(tmp_path: Path) -> None:
    store = Store(root=tmp_path, keep_versions=2)
    blob = encode_weights(W0)
    for v in (1, 2, 3):
        store.save_optimizer(v, b"stale from an earlier try")
        store.save_version(v, weights=blob, full=blob)  # a leftover .opt of v is not its own
        assert store.load_optimizer(v) is None
        store.save_optimizer(v, f"state {v}".encode())
        store.save_manifest(v, b"manifest")
    assert store.load_optimizer(1) is None  # pruned with version 1
    assert store.load_optimizer(3) == b"state 3"
    moved = store.quarantine_version(3, tmp_path / "q")
    assert any(p.name.endswith("000003.opt") for p in moved)


def test_a_state_that_cannot_be_written_does_not_undo_the_version(tmp_path: Path) -> None:
    store = Store(root=tmp_path)
    (tmp_path / "versions" / "000001.opt").mkdir()  # the write fails (a directory is in the way)
    opt = _opt("adam", store)
    opt.step(W0, D1)
    opt.commit(1)  # the version exists already: logged, and the state in memory goes on
    assert opt.state.step == 1 and opt.pending is None
