"""The demo's progress: a bar towards the target accuracy on a terminal, plain lines in a
log or a pipe (no terminal size), nothing for the aggregator's offline status."""

from __future__ import annotations

import io

from fedmq.demo_checks import DemoProgress

STATUS = {"rounds_closed": 3, "accuracy": 0.61, "round": {"id": 4, "received": 2, "target": 10},
          "devices": {"online": 9}}  # fmt: skip


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_without_a_terminal_one_plain_line_per_closed_round() -> None:
    out = io.StringIO()
    progress = DemoProgress(rounds=60, target=0.8, devices=10, stream=out)
    for status in (STATUS, STATUS, {"aggregator": "offline"}, {**STATUS, "rounds_closed": 4}):
        progress.update(status)
    progress.close()
    assert out.getvalue().splitlines() == [
        "round 3/60: accuracy 0.6100 (target 0.8), 9/10 devices online",
        "round 4/60: accuracy 0.6100 (target 0.8), 9/10 devices online",
    ]


def test_on_a_terminal_the_bar_ends_at_the_target_accuracy() -> None:
    out = Terminal()
    progress = DemoProgress(rounds=60, target=0.8, devices=10, stream=out)
    progress.update(STATUS)
    assert (progress.bar.n, progress.bar.total) == (61, 80)
    progress.close()
    assert "accuracy to 80%" in out.getvalue() and "3/60 rounds" in out.getvalue()


def test_without_a_central_test_set_the_progress_is_the_federated_accuracy() -> None:
    out = Terminal()
    progress = DemoProgress(rounds=60, target=0.8, devices=10, stream=out)
    progress.update({**STATUS, "accuracy": None, "federated": {"version": 2, "accuracy": 0.45}})
    assert progress.bar.n == 45
    progress.update({**STATUS, "accuracy": None, "federated": "not an object"})
    assert progress.bar.n == 0  # nothing to show yet, and no exception
    progress.close()
