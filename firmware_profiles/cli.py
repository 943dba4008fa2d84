"""`fedmq profile list|show|check`: the bundled firmware profiles and profile files.

Plain text; `check` prints one line per invalid file (naming the file and the key) on
stderr and exits 2, like every configuration error."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, fields

from firmware_profiles import Profile, ProfileError, list_profiles, load_profile, profile_path

EXIT_OK, EXIT_CONFIG = 0, 2


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `profile` command and its three subcommands."""
    p = sub.add_parser("profile", help="list, show or check firmware profiles (device "
                                       "classes: budgets, thermal and battery gates)")  # fmt: skip
    cmds = p.add_subparsers(dest="profile_command", required=True)
    cmds.add_parser("list", help="the bundled profiles, one line each")
    show = cmds.add_parser("show", help="every key of one profile, as TOML")
    show.add_argument("profile", metavar="NAME_OR_FILE")
    check = cmds.add_parser("check", help="validate profile files (default: every bundled "
                                          "one); exit 2 naming the file and key of the first "
                                          "problem in each invalid one")  # fmt: skip
    check.add_argument("files", nargs="*", metavar="FILE")


def _gates(p: Profile) -> str:
    if not p.can_train:
        return "inference only"
    gates = [f"<{p.max_temp_c:g} C" if p.max_temp_c else "no thermal gate"]
    if p.min_battery_pct:
        gates.append(f"battery >={p.min_battery_pct:g}%")
    if not p.train_on_battery:
        gates.append("mains only")
    return ", ".join(gates)


def run(args: argparse.Namespace) -> int:
    """Carry out `fedmq profile ...`; ProfileError (exit 2) for a profile that is not there."""
    if args.profile_command == "list":
        print(f"{'profile':18s} {'train':>5s} {'time s':>7s} {'mem MB':>7s} {'batch':>5s} "
              f"{'threads':>7s}  gates / description")  # fmt: skip
        for name in list_profiles():
            p = load_profile(name)
            print(f"{name:18s} {'yes' if p.can_train else 'no':>5s} {p.max_train_seconds:7g} "
                  f"{p.max_memory_mb:7d} {p.max_batch_size:5d} {p.torch_threads:7d}  "
                  f"{_gates(p)}; {p.description}")  # fmt: skip
        return EXIT_OK
    if args.profile_command == "show":
        p = load_profile(args.profile)
        print(f"# {profile_path(args.profile)}")
        values = asdict(p)
        for f in fields(Profile):
            v = values[f.name]
            text = ("true" if v else "false") if isinstance(v, bool) else (
                f'"{v}"' if isinstance(v, str) else repr(v))  # fmt: skip
            print(f"{f.name} = {text}")
        return EXIT_OK
    bad = 0
    for target in args.files or list_profiles():
        try:
            load_profile(target)
        except ProfileError as err:
            bad += 1
            print(f"fedmq: {err}", file=sys.stderr)
        else:
            print(f"ok {profile_path(target)}")
    return EXIT_CONFIG if bad else EXIT_OK
