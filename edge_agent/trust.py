"""What an agent trusts of the downlink: the signature rule shared by manifests and rounds,
and the gate every round announcement passes before the agent acts on it (pure: no socket,
clock or file)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedmq.signing import key_id, verify
from fedmq.topics import Topics
from fedmq.wire import RoundAnnouncement
from fedmq.wire.signed import Signature

ROUND_REJECT_CODES = ("unsigned", "bad_signature", "wrong_job", "wrong_task", "stale_round",
                      "train_limits")  # fmt: skip


@dataclass(frozen=True)
class Refusal:
    """A downlink message the agent does not act on, and why."""

    code: str
    reason: str


@dataclass(frozen=True)
class DownlinkTrust:
    """The pinned aggregator key, if any, and whether unsigned downlink is accepted.

    server_key set, not insecure: every manifest and round must carry a valid signature by
    it. server_key set and insecure: unsigned ones are accepted, signed ones must verify.
    No server_key: nothing can be verified; unsigned (and signed) messages are accepted as
    unverified, and the agent counts them."""

    server_key: Ed25519PublicKey | None = None
    insecure: bool = False

    @property
    def key_id(self) -> str:
        return key_id(self.server_key) if self.server_key is not None else ""

    def describe(self, *, insecure: bool) -> tuple[int, str]:
        """(log level, line) saying at start what this device trusts."""
        if self.server_key is not None:
            also = " (insecure: unsigned accepted too)" if insecure else ""
            return logging.INFO, f"downlink must be signed by key {self.key_id}{also}"
        if insecure:
            return logging.WARNING, ("insecure: manifests and rounds are accepted unsigned, "
                                     "from anyone who can publish on the broker")
        return logging.WARNING, ("no server_key pinned: manifests and rounds cannot be "
                                 "verified and are accepted unsigned (counted as unverified_*)")

    def judge(self, sig: Signature | None, topic: str, what: str) -> tuple[bool, Refusal | None]:
        """(verified, refusal): whether the message on topic verified, or why it is refused."""
        if self.server_key is None:
            return False, None
        if sig is None:
            if self.insecure:
                return False, None
            return False, Refusal("unsigned", f"{what} is not signed; this device trusts "
                                              f"only key {self.key_id}")  # fmt: skip
        why = verify(self.server_key, topic, sig)
        if why is not None:
            return False, Refusal("bad_signature", f"{what}: {why}")
        return True, None


RoundKey = tuple[int, int, int]  # (epoch, round id, 0 open / 1 closed or abandoned)


class RoundGate:
    """Whether a round announcement may be acted on: its signature, job, task, order, and a
    training config within this device's profile."""

    def __init__(
        self,
        *,
        topics: Topics,
        task: str,
        trust: DownlinkTrust,
        max_epochs: int,
        max_lr: float,
        max_prox_mu: float = 0.0,
        last: RoundKey | None = None,
    ) -> None:
        if max_epochs < 1 or not max_lr > 0:
            raise ValueError("max_epochs must be at least 1 and max_lr positive")
        self.topics = topics
        self.task = task
        self.trust = trust
        self.max_epochs = max_epochs
        self.max_lr = max_lr
        self.max_prox_mu = max_prox_mu
        self.last = last  # the newest signed round accepted (persisted by the agent)

    def check(self, r: RoundAnnouncement) -> tuple[bool, Refusal | None]:
        """(verified, refusal); a round that is accepted and verified moves `last` forward."""
        what = f"round {r.round_id} ({r.state})"
        verified, refusal = self.trust.judge(r.sig, self.topics.round(), what)
        if refusal is not None:
            return verified, refusal
        if r.job != self.topics.job:
            return verified, Refusal("wrong_job", f"{what} is for job {r.job!r}, this device "
                                                  f"is in {self.topics.job!r}")  # fmt: skip
        if r.task and r.task != self.task:
            return verified, Refusal("wrong_task", f"{what} is for task {r.task!r}, this "
                                                   f"device trains {self.task!r}")  # fmt: skip
        key = (r.epoch, r.round_id, 0 if r.state == "open" else 1)
        # only a signed round's epoch and id can be trusted to order rounds
        if verified and self.last is not None and key < self.last:
            return verified, Refusal("stale_round", f"{what} of epoch {r.epoch} is older than "
                                                    f"round {self.last[1]} of epoch "
                                                    f"{self.last[0]}, already seen")  # fmt: skip
        t = r.train
        if r.state == "open" and (t.epochs > self.max_epochs or t.lr > self.max_lr):
            return verified, Refusal("train_limits", (
                f"{what} asks for {t.epochs} epochs at lr {t.lr:g}; this device's profile "
                f"allows at most {self.max_epochs} epochs and lr {self.max_lr:g}"))  # fmt: skip
        # FedProx: a mu beyond the profile, or one that makes every local step overshoot the
        # global model (lr x mu >= 1), is refused like any out-of-profile value
        if r.state == "open" and t.prox_mu and (t.prox_mu > self.max_prox_mu
                                                or t.prox_mu * t.lr >= 1):  # fmt: skip
            return verified, Refusal("train_limits", (
                f"{what} asks for FedProx mu {t.prox_mu:g} at lr {t.lr:g}; this device's "
                f"profile allows mu up to {self.max_prox_mu:g} and mu x lr below 1"))  # fmt: skip
        if verified:
            self.last = key
        return verified, None
