"""Federated evaluation: devices judge each global version on their own held-out data.

A device that holds a new version v publishes one `metrics` message for it (docs/protocol.md
section 4.8) carrying `eval_loss` (mean cross-entropy per example), `eval_accuracy` (the
fraction it got right) and `eval_examples` (how many examples it held out). This module
checks such a report, keeps at most one per device per version for the last few versions,
and combines them: example-weighted accuracy and loss, which are exactly what one evaluation
on the union of the devices' held-out sets gives, plus the spread across devices.

Which result goes where (docs/devices.md "Federated evaluation"): the history record of a
round carries `federated` for the version the round started from (its `base_version`),
as far as reports arrived before the round closed; the status carries the newest version's
live result. Reports live in memory only: after a restart, a version's result counts the
reports that arrive from then on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmq.errors import DuplicateReport, OutOfBounds, OverCapacity, SchemaError, StaleUpdate

EVAL_ACCURACY, EVAL_LOSS, EVAL_EXAMPLES = "eval_accuracy", "eval_loss", "eval_examples"
EVAL_KEYS = (EVAL_ACCURACY, EVAL_LOSS, EVAL_EXAMPLES)
KEEP_VERSIONS = 4  # versions whose reports are kept: the current one and three before it
MAX_EVAL_EXAMPLES = 1_000_000  # held-out examples one device may claim
MAX_EVAL_LOSS = 1e4  # mean cross-entropy; float32 logits cannot honestly go far beyond ~100


@dataclass(frozen=True)
class EvalReport:
    """One device's evaluation of one global version on its held-out data."""

    device: str
    version: int
    accuracy: float
    loss: float
    examples: int


def read_report(device: str, version: int, metrics: Mapping[str, float], *,
                max_examples: int = MAX_EVAL_EXAMPLES) -> EvalReport | None:  # fmt: skip
    """The evaluation report in a device's metrics; None when they carry none (training
    metrics); SchemaError or OutOfBounds when one is incomplete or out of range."""
    present = [k for k in EVAL_KEYS if k in metrics]
    if not present:
        return None
    if len(present) != len(EVAL_KEYS):
        raise SchemaError(f"metrics: an evaluation report carries all of {', '.join(EVAL_KEYS)}")
    accuracy, loss, examples = (float(metrics[k]) for k in EVAL_KEYS)
    if not all(math.isfinite(v) for v in (accuracy, loss, examples)):
        raise SchemaError("metrics: an evaluation report's values must be finite")
    if not 0.0 <= accuracy <= 1.0:
        raise OutOfBounds(f"metrics: {EVAL_ACCURACY} {accuracy:g} is not in [0, 1]")
    if not 0.0 <= loss <= MAX_EVAL_LOSS:
        raise OutOfBounds(f"metrics: {EVAL_LOSS} {loss:g} is not in [0, {MAX_EVAL_LOSS:g}]")
    if examples != int(examples) or not 1 <= examples <= max_examples:
        raise OutOfBounds(f"metrics: {EVAL_EXAMPLES} {examples:g} is not a whole number in "
                          f"[1, {max_examples}]")  # fmt: skip
    if version < 0:
        raise SchemaError(f"metrics: model_version {version} is negative")
    return EvalReport(device=device, version=version, accuracy=accuracy, loss=loss,
                      examples=int(examples))  # fmt: skip


def combine(reports: Sequence[EvalReport]) -> dict[str, Any]:
    """One version's federated result: `accuracy` and `loss` weighted by examples (the
    value on the union of the held-out sets), `devices`, `examples`, and the spread of the
    devices' accuracies (`accuracy_min`, `_max`, `_std`, `_p10`, `_p90`, unweighted: one
    device one value) and losses (`loss_min`, `loss_max`)."""
    if not reports:
        raise ValueError("combine needs at least one report")
    versions = {r.version for r in reports}
    if len(versions) != 1:
        raise ValueError(f"combine takes the reports of one version, got {sorted(versions)}")
    n = np.array([r.examples for r in reports], dtype=np.float64)
    acc = np.array([r.accuracy for r in reports], dtype=np.float64)
    loss = np.array([r.loss for r in reports], dtype=np.float64)
    total = float(n.sum())
    p10, p90 = (float(v) for v in np.percentile(acc, [10, 90]))
    return {
        "version": reports[0].version,
        "devices": len(reports),
        "examples": int(total),
        "accuracy": float((acc * n).sum() / total),
        "loss": float((loss * n).sum() / total),
        "accuracy_min": float(acc.min()),
        "accuracy_max": float(acc.max()),
        "accuracy_std": float(acc.std()),
        "accuracy_p10": p10,
        "accuracy_p90": p90,
        "loss_min": float(loss.min()),
        "loss_max": float(loss.max()),
    }


class FederatedEval:
    """The reports of the last KEEP_VERSIONS versions, one per device per version.

    Bounded: versions older than the window and newer than the current one are refused,
    and a version holds at most max_devices reports (the service only passes devices of its
    device table, itself bounded)."""

    def __init__(self, *, keep_versions: int = KEEP_VERSIONS, max_devices: int = 10_000,
                 max_examples: int = MAX_EVAL_EXAMPLES) -> None:  # fmt: skip
        if keep_versions < 1 or max_devices < 1 or max_examples < 1:
            raise ValueError("keep_versions, max_devices and max_examples must be at least 1")
        self.keep_versions, self.max_devices = keep_versions, max_devices
        self.max_examples = max_examples
        self._reports: dict[int, dict[str, EvalReport]] = {}

    def observe(self, device: str, version: int, metrics: Mapping[str, float], *,
                current: int) -> EvalReport | None:  # fmt: skip
        """Take a device's metrics message about version while current is the newest
        version. The report when it is a new one; None when the metrics carry no report or
        repeat one already taken (QoS 1 redelivers); a ProtocolError when refused."""
        report = read_report(device, version, metrics, max_examples=self.max_examples)
        if report is None:
            return None
        if version > current:
            raise OutOfBounds(f"metrics: an evaluation of version {version}, newer than the "
                              f"current version {current}")  # fmt: skip
        if version <= current - self.keep_versions:
            raise StaleUpdate(f"metrics: an evaluation of version {version}; only versions "
                              f"after {current - self.keep_versions} are collected")  # fmt: skip
        self._prune(current)
        held = self._reports.setdefault(version, {})
        first = held.get(device)
        if first is not None:
            if first == report:
                return None
            raise DuplicateReport(f"metrics: a second, different evaluation of version "
                                  f"{version} (the first one counts)")  # fmt: skip
        if len(held) >= self.max_devices:
            raise OverCapacity(f"metrics: version {version} already holds {len(held)} reports")
        held[device] = report
        return report

    def _prune(self, current: int) -> None:
        for version in [v for v in self._reports if v <= current - self.keep_versions]:
            del self._reports[version]

    def result(self, version: int) -> dict[str, Any] | None:
        """combine() of the reports of version so far; None without any."""
        held = self._reports.get(version)
        return combine(sorted(held.values(), key=lambda r: r.device)) if held else None

    def latest(self) -> dict[str, Any] | None:
        """The result of the newest version that has reports; None without any."""
        return self.result(max(self._reports)) if self._reports else None


def headline(metrics: Mapping[str, float], federated: Mapping[str, Any] | None) -> str:
    """A version's accuracy and loss for a log line: central when there is a test set, else
    federated, else a note that neither exists yet."""
    parts = []
    if "accuracy" in metrics:
        loss = metrics.get("loss", math.nan)
        parts.append(f"accuracy {metrics['accuracy']:.4f}, loss {loss:.4f}")
    if federated:
        parts.append(f"federated accuracy {federated['accuracy']:.4f} of version "
                     f"{federated['version']} ({federated['devices']} devices)")  # fmt: skip
    return "; ".join(parts) or "no central test set"


def accuracy_of(metrics: Mapping[str, float], federated: Mapping[str, Any] | None) -> float | None:
    """The accuracy that decides targets: the central test set's when there is one, else the
    newest federated result's; None without either."""
    if "accuracy" in metrics:
        return float(metrics["accuracy"])
    if federated and federated.get("accuracy") is not None:
        return float(federated["accuracy"])
    return None
