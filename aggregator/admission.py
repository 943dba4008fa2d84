"""Admission: from a reassembled payload to an update fit to fold in, or a refusal.

Pure: no sockets, no clock, no files. `decode` checks what the payload claims (its
device and id match the topic it came on and the chunks it came in, its size the round's
byte budget); `validate` decodes its tensors against the model and runs every check.
More checks (a signature, a norm bound) plug in as `checks`: functions that raise a
ProtocolError to refuse an update.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from aggregator.bounds import example_cap
from aggregator.personal import shared_body
from fedmq.codecs import Decoded, decode_tensors
from fedmq.errors import SchemaError, Unauthorized
from fedmq.topics import check_name
from fedmq.wire import TensorSpec, Update, decode_update

MAX_EXAMPLES_PER_UPDATE = 10_000_000

# A check refuses an update by raising a ProtocolError with the reason.
Check = Callable[[Update, Mapping[str, Decoded]], None]


def check_examples(u: Update, tensors: Mapping[str, Decoded]) -> None:
    """Refuse an implausible example count (it is the update's FedAvg weight)."""
    del tensors
    if not 0 < u.num_examples <= MAX_EXAMPLES_PER_UPDATE:
        raise SchemaError(f"num_examples {u.num_examples} is implausible")


def check_device_id(device: str | None) -> str:
    """The device id a topic names, if it is a valid name; SchemaError before any other use
    (an id is a topic level, a file name, a log field and a key in every table)."""
    try:
        return check_name("device id", device or "")
    except ValueError as err:
        raise SchemaError(f"the topic's {err}") from None


def check_enrolled(device: str, enrolled: frozenset[str] | None) -> None:
    """Unauthorized unless the device is enrolled (when a fleet file says who is)."""
    if enrolled is not None and device not in enrolled:
        raise Unauthorized("device is not enrolled in this job's fleet file")


@dataclass(frozen=True)
class Admission:
    """The rules every update passes before it touches the sum."""

    specs: tuple[TensorSpec, ...]
    max_update_bytes: int
    budget_bytes: int = 0  # the byte budget announced to devices; 0: none
    checks: Sequence[Check] = (check_examples,)
    enrolled: frozenset[str] | None = None  # the fleet file's devices; None: any valid id
    max_examples: int = MAX_EXAMPLES_PER_UPDATE  # the policy's cap on num_examples
    example_caps: Mapping[str, int] = field(default_factory=dict)  # fleet file max_examples
    # fedper's personal head (aggregator.personal): tensors an update leaves out; empty: none
    head: frozenset[str] = frozenset()

    def sender(self, device: str | None) -> str:
        """The topic's device id, checked before anything else is done with the message:
        a valid name, and enrolled when a fleet file is set; ProtocolError if not."""
        device = check_device_id(device)
        check_enrolled(device, self.enrolled)
        return device

    def cap_examples(self, u: Update, round_cap: int = 0) -> Update:
        """The update with num_examples (its FedAvg weight) capped by the policy, by what
        its device enrolled with and by the round's adaptive cap (round_cap, 0: none): an
        inflated count weighs no more than the cap."""
        cap = example_cap(u.device, max_examples=self.max_examples, enrolled=self.example_caps)
        if round_cap > 0:
            cap = min(cap, round_cap)
        # an implausible claim is left as it is, for check_examples to refuse with a reason
        if cap < u.num_examples <= MAX_EXAMPLES_PER_UPDATE:
            return dataclasses.replace(u, num_examples=cap)
        return u

    def decode(self, payload: bytes, *, device: str, payload_id: str) -> Update:
        """Decode and authorise an update; ProtocolError if it lies about where it is from."""
        u = decode_update(payload, max_bytes=self.max_update_bytes)
        if u.device != device or u.update_id != payload_id:
            raise Unauthorized(f"update claims device {u.device!r} / id {u.update_id}")
        if self.budget_bytes and len(payload) > self.budget_bytes:
            raise SchemaError(
                f"update of {len(payload)} bytes is over the round's "
                f"{self.budget_bytes}-byte budget"
            )
        return u

    def validate(self, u: Update) -> dict[str, Decoded]:
        """The update's tensors, decoded against the model and checked; ProtocolError if not.

        Any pipeline fedmq can decode is accepted (a device's budget may have made it
        sparser than announced); a sparse tensor stays sparse and is scattered into the sum.
        """
        tensors = decode_tensors(u.body, u.codec, self.specs, optional=self.head)
        if self.head:
            tensors = shared_body(tensors, self.specs, self.head)
        for check in self.checks:
            check(u, tensors)
        return tensors
