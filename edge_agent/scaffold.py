"""SCAFFOLD on a device: its control variate c_i and the server's c of the held version,
both kept in the device's state directory so they survive a restart.

c_i starts at zero (a file that is missing, does not decode or does not fit the model
starts it afresh). It moves on when an update that carries its delta enters the outbox:
the delta travels with that update, which the outbox sends until it is acknowledged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edge_agent.fetch import HoldControl
from edge_agent.state import DeviceStore
from fedmq.correction import Tensors, gradient_correction, with_control, zeros_like
from fedmq.wire import RoundAnnouncement, TensorSpec

LOCAL_FILE = "control.weights"
SERVER_FILE = "server_control.weights"


class DeviceControl:
    """c_i and the held c of one device."""

    def __init__(self, *, store: DeviceStore, specs: Sequence[TensorSpec] | None,
                 progress: dict[str, Any]) -> None:  # fmt: skip
        self.store = store
        self.specs = tuple(specs or ())
        self.server = store.load_tensors(SERVER_FILE, self.specs) if specs else None
        self.version = int(progress.get("control_version", -1)) if self.server else -1
        self.local = store.load_tensors(LOCAL_FILE, self.specs) if specs else None

    def took(self, a: object) -> bool:
        """Keep the c of a held version if `a` is one (file first; the caller saves the
        progress); False for any other action."""
        if not isinstance(a, HoldControl):
            return False
        self.store.save_tensors(SERVER_FILE, a.control)
        self.server, self.version = a.control, a.version
        return True

    @staticmethod
    def fetched_bytes(a: object) -> int:
        """The downlink bytes a HoldControl took."""
        return a.fetched_bytes if isinstance(a, HoldControl) else 0

    def ready(self, r: RoundAnnouncement) -> bool:
        """Whether this device can train round r: a SCAFFOLD round needs c of its version."""
        return r.train.correction != "scaffold" or self.version == r.model_version

    def correction(self, r: RoundAnnouncement) -> dict[str, np.ndarray] | None:
        """c - c_i for the local steps of round r; None when it does not announce SCAFFOLD."""
        if r.train.correction != "scaffold" or self.server is None:
            return None
        if self.local is None:
            self.local = zeros_like(self.server)
        return gradient_correction(self.server, self.local)

    def attach(self, r: RoundAnnouncement, base: Tensors, trained: Tensors,
               steps: int) -> tuple[Tensors, Tensors, Tensors]:  # fmt: skip
        """(base, trained) with c_i and c_i+ attached (their difference is the update body),
        and c_i+ to keep once the update is in the outbox."""
        assert self.server is not None and self.local is not None
        return with_control(base=base, trained=trained, c_server=self.server,
                            c_local=self.local, steps=max(1, steps), lr=r.train.lr)  # fmt: skip

    def commit(self, c_new: dict[str, np.ndarray]) -> None:
        """The update carrying c_i+ - c_i is in the outbox: c_i becomes c_i+."""
        self.store.save_tensors(LOCAL_FILE, c_new)
        self.local = c_new
