"""Firmware profiles: bundled ones load; bad files are refused with a reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from firmware_profiles import list_profiles, load_profile


def test_bundled_profiles_load() -> None:
    names = list_profiles()
    assert {"rpi4", "rpi-zero2w", "jetson-nano", "sensor-infer"} <= set(names)
    for name in names:
        assert load_profile(name).name == name
    assert load_profile("sensor-infer").can_train is False
    assert load_profile("rpi-zero2w").max_message_bytes == 131072


def test_profile_from_file_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "tiny.toml"
    good.write_text("max_train_seconds = 5\ntorch_threads = 1\n")
    p = load_profile(str(good))
    assert p.name == "tiny" and p.max_train_seconds == 5
    bad = tmp_path / "bad.toml"
    bad.write_text("max_train_seconds = -1\n")
    with pytest.raises(ValueError, match="must be positive"):
        load_profile(str(bad))
    typo = tmp_path / "typo.toml"
    typo.write_text("max_train_secs = 5\n")
    with pytest.raises(ValueError, match="max_train_secs: unknown key"):
        load_profile(str(typo))
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('torch_threads = "two"\n')
    with pytest.raises(ValueError, match="wrong type"):
        load_profile(str(wrong))
    with pytest.raises(ValueError, match="bundled"):
        load_profile("no-such-board")
