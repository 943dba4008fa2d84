"""The agent's state directory: held model, progress, error-feedback residual."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_agent.state import DeviceStore


def test_residual_survives_a_new_store_and_none_forgets_it(tmp_path: Path) -> None:
    residual = {"w": np.arange(6, dtype=np.float32).reshape(2, 3) / 7, "b": np.ones(2, np.float32)}
    DeviceStore(root=tmp_path).save_residual(residual)
    again = DeviceStore(root=tmp_path).load_residual()  # as after a restart
    assert again is not None and again.keys() == residual.keys()
    for name, arr in residual.items():
        np.testing.assert_array_equal(again[name], arr)
        assert again[name].dtype == np.float32
    DeviceStore(root=tmp_path).save_residual(None)
    assert DeviceStore(root=tmp_path).load_residual() is None
    assert not (tmp_path / "residual.weights").exists()
