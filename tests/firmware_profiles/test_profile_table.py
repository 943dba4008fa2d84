"""Profiles that decide: every bundled class loads with its gates; each bad key or value
is refused with one message naming the file and the key; `fedmq profile` lists, shows and
checks them (exit 2 on an invalid file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmq.cli import main
from firmware_profiles import ProfileError, bundled, list_profiles, load_profile

CLASSES = ("rpi-zero-2w", "rpi3b", "rpi4-2gb", "rpi5-8gb", "jetson-nano", "jetson-orin-nano",
           "sensor-infer", "rpi4", "rpi-zero2w")  # fmt: skip


def test_bundled_classes_carry_realistic_budgets_and_gates() -> None:
    assert set(CLASSES) <= set(list_profiles())
    for name in CLASSES:
        p = load_profile(name)
        assert p.name == name and p.description
        if p.can_train:
            assert 60 <= p.max_temp_c <= 90, name  # every trainer has a thermal gate
    zero, pi5 = load_profile("rpi-zero-2w"), load_profile("rpi5-8gb")
    assert zero.max_memory_mb < 512 < pi5.max_memory_mb and zero.torch_threads < pi5.torch_threads
    assert zero.min_battery_pct > 0 and not load_profile("jetson-nano").train_on_battery
    assert load_profile("sensor-infer").can_train is False
    assert bundled("rpi3b") == load_profile("rpi3b") and bundled("../rpi3b") is None


@pytest.mark.parametrize(("text", "key", "words"), [
    ("max_temp_c = 400\n", "max_temp_c", "150"),
    ("max_temp_c = -5\n", "max_temp_c", "no thermal gate"),
    ("max_temp_c = nan\n", "max_temp_c", "finite"),
    ("min_battery_pct = 120\n", "min_battery_pct", "[0, 100]"),
    ("train_on_battery = 1\n", "train_on_battery", "wrong type"),
    ("max_train_seconds = 0\n", "max_train_seconds", "positive"),
    ("max_train_seconds = inf\n", "max_train_seconds", "finite"),
    ("max_memory_mb = 16\n", "max_memory_mb", "at least 32"),
    ("max_batch_size = 0\n", "max_batch_size", "at least 1"),
    ("max_update_bytes = -1\n", "max_update_bytes", ">= 0"),
    ("max_message_bytes = 100\n", "max_message_bytes", "1024"),
    ("torch_threads = 0\n", "torch_threads", "[1, 256]"),
    ("torch_threads = 2.5\n", "torch_threads", "wrong type"),
    ("max_epochs = 0\n", "max_epochs", "at least 1"),
    ("max_lr = 0\n", "max_lr", "positive"),
    ("max_prox_mu = -1\n", "max_prox_mu", ">= 0"),
    ("can_train = \"yes\"\n", "can_train", "wrong type"),
    ("max_temp = 80\n", "max_temp", "unknown key"),
])  # fmt: skip
def test_each_bad_key_is_named_with_its_file(tmp_path: Path, text: str, key: str,
                                             words: str) -> None:  # fmt: skip
    path = tmp_path / "board.toml"
    path.write_text("description = 'a board'\n" + text)
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    msg = str(info.value)
    assert info.value.key == key and msg.startswith(f"profile {path}: {key}: "), msg
    assert words in msg and "\n" not in msg


def test_broken_toml_and_missing_profile_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("max_temp_c = \n")
    with pytest.raises(ProfileError, match=f"profile {path}: not valid TOML"):
        load_profile(str(path))
    with pytest.raises(ProfileError, match="no such firmware profile; bundled: jetson-nano"):
        load_profile("no-such-board")


def test_profile_cli_lists_shows_and_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            ) -> None:  # fmt: skip
    assert main(["profile", "list"]) == 0
    out = capsys.readouterr().out
    for name in CLASSES:
        assert f"\n{name} " in out
    assert "<78 C, battery >=30%" in out and "inference only" in out
    assert main(["profile", "show", "jetson-orin-nano"]) == 0
    shown = capsys.readouterr().out
    assert "max_temp_c = 85.0" in shown and "train_on_battery = false" in shown
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text("max_temp_c = 70\nmin_battery_pct = 20\n")
    bad.write_text("max_temp_c = 70\nmin_battery_pct = 200\n")
    assert main(["profile", "check", str(good)]) == 0
    assert capsys.readouterr().out == f"ok {good}\n"
    assert main(["profile", "check", str(good), str(bad)]) == 2
    got = capsys.readouterr()
    assert got.out == f"ok {good}\n"
    assert got.err.splitlines() == [f"fedmq: profile {bad}: min_battery_pct: 200 must be a "
                                    "percentage in [0, 100] (0: no battery gate)"]  # fmt: skip
    assert main(["profile", "check"]) == 0  # every bundled profile is valid
    assert capsys.readouterr().out.count("ok ") == len(list_profiles())
    assert main(["profile", "show", "no-such-board"]) == 2
