"""A round's messages: the announcement, a device's update, the aggregator's ack."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedmq.errors import SchemaError
from fedmq.wire.framing import (
    MAX_MESSAGE_BYTES,
    get_field,
    num_map,
    pack_message,
    str_list,
    unpack_message,
)
from fedmq.wire.signed import Signature, SignFn, read_signature, sign_body

# ---------------------------------------------------------------- round announcement

MAX_PROX_MU = 1000.0  # the largest FedProx mu a round message may carry (profiles allow less)
PERSONALIZATIONS = ("none", "finetune", "fedper")  # docs/strategies.md, "Personal models"
MAX_PERSONAL_STEPS = 100_000  # local steps of a personal model a round may ask for
MAX_HEAD_TENSORS = 16  # tensor names a fedper round may name as the personal head


@dataclass(frozen=True)
class TrainConfig:
    """What a device does locally in a round."""

    epochs: int = 1
    batch_size: int = 10
    lr: float = 0.05
    momentum: float = 0.0
    prox_mu: float = 0.0  # FedProx: mu/2 ||w - w_global||^2 added to the local loss; 0: off
    # personal models (docs/strategies.md): none | finetune | fedper, the local steps of
    # the personal model, and under fedper the tensors that stay on the device (the head)
    personal: str = "none"
    personal_steps: int = 0
    personal_head: tuple[str, ...] = ()
    correction: str = "none"  # "scaffold": control-variate corrected steps (fedmq.correction)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not (0 < self.lr < 100):
            raise ValueError(
                f"training config needs epochs >= 1, batch_size >= 1 and 0 < lr < 100, "
                f"got epochs={self.epochs} batch_size={self.batch_size} lr={self.lr}"
            )
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.prox_mu <= MAX_PROX_MU:
            raise ValueError(f"prox_mu must be in [0, {MAX_PROX_MU:g}], got {self.prox_mu}")
        self._check_personal()
        if self.correction not in ("none", "scaffold"):
            raise ValueError(f"unknown correction {self.correction!r} (none or scaffold)")

    def _check_personal(self) -> None:
        if self.personal not in PERSONALIZATIONS:
            raise ValueError(f"personal must be one of {', '.join(PERSONALIZATIONS)}, "
                             f"got {self.personal!r}")  # fmt: skip
        if not 0 <= self.personal_steps <= MAX_PERSONAL_STEPS:
            raise ValueError(f"personal_steps must be in [0, {MAX_PERSONAL_STEPS}], "
                             f"got {self.personal_steps}")  # fmt: skip
        head = self.personal_head
        if head and self.personal != "fedper":
            raise ValueError("personal_head names the head tensors of fedper, and only of fedper")
        if len(head) > MAX_HEAD_TENSORS or len(set(head)) != len(head) or any(
            not 0 < len(n) <= MAX_CODEC_CHARS for n in head
        ):
            raise ValueError(f"personal_head: at most {MAX_HEAD_TENSORS} distinct names of "
                             f"1-{MAX_CODEC_CHARS} characters")  # fmt: skip


@dataclass(frozen=True)
class RoundAnnouncement:
    """The retained message on <job>/round: the open round, or the last one's outcome."""

    job: str
    round_id: int
    model_version: int
    state: str  # "open" | "closed" | "abandoned"
    opened_at: float
    deadline: float
    selected: tuple[str, ...]
    target: int
    min_devices: int
    train: TrainConfig
    codec: str = "float32"  # the update pipeline devices use (fedmq.codecs)
    max_update_bytes: int = 0  # byte budget of one update payload; 0: no budget
    task: str = ""  # the job's task; "" from aggregators before signed downlink
    epoch: int = 0  # the aggregator state directory's lineage (ms since 1970); 0: unknown
    done: bool = False  # the job's last round: its devices may stop (optional on the wire)
    # set by decode_round when the message was signed; never compared
    sig: Signature | None = field(default=None, compare=False, repr=False)


ROUND_STATES = ("open", "closed", "abandoned")
MAX_CODEC_CHARS = 128  # a pipeline name (fedmq.codecs) is far shorter
ROUND_MAX_BYTES = 1 << 20  # the most a device reads of a round message
ROUND_FIXED_BYTES = 512  # a round message without its selected ids, with room to spare
SELECTED_ID_BYTES = 66  # one id in `selected`: up to 64 characters and a 2-byte header


def max_selected_ids(max_message_bytes: int) -> int:
    """How many device ids a round message may list and still fit one message of
    max_message_bytes (and a device's 1 MiB cap): the round selects at most this many."""
    room = min(max_message_bytes, ROUND_MAX_BYTES) - ROUND_FIXED_BYTES
    return max(1, room // SELECTED_ID_BYTES)


def encode_round(r: RoundAnnouncement, *, sign: SignFn | None = None) -> bytes:
    """The retained message on <job>/round; signed over every field when sign is given."""
    body = {
        "job": r.job,
        "round": r.round_id,
        "model_version": r.model_version,
        "state": r.state,
        "opened_at": r.opened_at,
        "deadline": r.deadline,
        "selected": list(r.selected),
        "target": r.target,
        "min_devices": r.min_devices,
        "train": {
            "epochs": r.train.epochs,
            "batch_size": r.train.batch_size,
            "lr": r.train.lr,
            "momentum": r.train.momentum,
            # only when on: a round without it is byte for byte what it was before FedProx
            **({"prox_mu": r.train.prox_mu} if r.train.prox_mu else {}),
            **_personal_fields(r.train),
            **({"correction": r.train.correction} if r.train.correction != "none" else {}),
        },
        "codec": r.codec,
        "max_update_bytes": r.max_update_bytes,
        "task": r.task,
        "epoch": r.epoch,
    }
    if r.done:  # absent unless true: older devices ignore it, and verify the rest as before
        body["done"] = True
    return pack_message("round", sign_body("round", body, sign))


def _personal_fields(t: TrainConfig) -> dict[str, object]:
    """The personal-model fields of a round's train map: none at all when it is off, so
    such a round is byte for byte what it was before personal models."""
    if t.personal == "none":
        return {}
    head = {"personal_head": list(t.personal_head)} if t.personal_head else {}
    return {"personal": t.personal, "personal_steps": t.personal_steps, **head}


def decode_round(payload: bytes, *, max_bytes: int = ROUND_MAX_BYTES) -> RoundAnnouncement:
    """Inverse of encode_round."""
    obj = unpack_message(payload, "round", max_bytes)
    t = get_field(obj, "train", "map")
    try:
        train = TrainConfig(
            epochs=get_field(t, "epochs", "int"),
            batch_size=get_field(t, "batch_size", "int"),
            lr=float(get_field(t, "lr", "num")),
            momentum=float(get_field(t, "momentum", "num")),
            # optional: absent from aggregators before FedProx and when it is off
            prox_mu=float(get_field(t, "prox_mu", "num", optional=True) or 0.0),
            # optional: absent from aggregators before personal models and when they are off
            personal=get_field(t, "personal", "str", optional=True) or "none",
            personal_steps=get_field(t, "personal_steps", "int", optional=True) or 0,
            personal_head=str_list(t, "personal_head") if "personal_head" in t else (),
            # optional: absent when off; a value this device does not know drops the round
            correction=get_field(t, "correction", "str", optional=True) or "none",
        )
    except ValueError as err:
        raise SchemaError(f"round: {err}") from err
    if train.personal == "fedper" and not train.personal_head:
        raise SchemaError("round: fedper without personal_head (the tensors kept on devices)")
    r = RoundAnnouncement(
        job=get_field(obj, "job", "str"),
        round_id=get_field(obj, "round", "int"),
        model_version=get_field(obj, "model_version", "int"),
        state=get_field(obj, "state", "str"),
        opened_at=float(get_field(obj, "opened_at", "num")),
        deadline=float(get_field(obj, "deadline", "num")),
        selected=str_list(obj, "selected"),
        target=get_field(obj, "target", "int"),
        min_devices=get_field(obj, "min_devices", "int"),
        train=train,
        codec=get_field(obj, "codec", "str"),
        max_update_bytes=get_field(obj, "max_update_bytes", "int"),
        # optional: aggregators before signed downlink do not send them
        task=get_field(obj, "task", "str", optional=True) or "",
        epoch=get_field(obj, "epoch", "int", optional=True) or 0,
        done=bool(get_field(obj, "done", "bool", optional=True)),
        sig=read_signature(obj),
    )
    if r.state not in ROUND_STATES:
        raise SchemaError(f"round: unknown state {r.state!r}")
    return r


# ---------------------------------------------------------------- update


@dataclass(frozen=True)
class Update:
    """One device's contribution to one round: a delta from the version it trained on,
    encoded by the codec pipeline it names (fedmq.codecs decodes body against the model)."""

    update_id: str
    device: str
    round_id: int
    base_version: int
    num_examples: int
    codec: str
    body: bytes
    metrics: dict[str, float] = field(default_factory=dict)
    fetched_bytes: int = 0  # downlink bytes this device received to take part


def encode_update(u: Update) -> bytes:
    """The payload a device publishes (chunked) on <job>/update/<device>."""
    return pack_message(
        "update",
        {
            "id": u.update_id,
            "device": u.device,
            "round": u.round_id,
            "base_version": u.base_version,
            "num_examples": u.num_examples,
            "codec": u.codec,
            "body": u.body,
            "metrics": dict(u.metrics),
            "fetched_bytes": u.fetched_bytes,
        },
    )


def decode_update(payload: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Update:
    """Inverse of encode_update (structure only; the aggregator validates against its model)."""
    obj = unpack_message(payload, "update", max_bytes)
    u = Update(
        update_id=get_field(obj, "id", "str"),
        device=get_field(obj, "device", "str"),
        round_id=get_field(obj, "round", "int"),
        base_version=get_field(obj, "base_version", "int"),
        num_examples=get_field(obj, "num_examples", "int"),
        codec=get_field(obj, "codec", "str"),
        body=get_field(obj, "body", "bytes"),
        metrics=num_map(obj, "metrics"),
        fetched_bytes=get_field(obj, "fetched_bytes", "int"),
    )
    if not 0 < len(u.update_id) <= 64:
        raise SchemaError("update: id must be 1-64 characters")
    if len(u.codec) > MAX_CODEC_CHARS or len(u.device) > MAX_CODEC_CHARS:
        raise SchemaError(f"update: codec and device are at most {MAX_CODEC_CHARS} characters")
    if u.num_examples <= 0:
        raise SchemaError(f"update: num_examples must be positive, got {u.num_examples}")
    return u


# ---------------------------------------------------------------- ack


ACK_STATUSES = ("accepted", "rejected", "late")


@dataclass(frozen=True)
class Ack:
    """The aggregator's answer to one update."""

    update_id: str
    round_id: int
    status: str  # accepted | rejected | late
    reason: str = ""


def encode_ack(a: Ack) -> bytes:
    """The message on <job>/ack/<device>."""
    return pack_message(
        "ack", {"id": a.update_id, "round": a.round_id, "status": a.status, "reason": a.reason}
    )


def decode_ack(payload: bytes, *, max_bytes: int = 64 * 1024) -> Ack:
    """Inverse of encode_ack."""
    obj = unpack_message(payload, "ack", max_bytes)
    a = Ack(
        update_id=get_field(obj, "id", "str"),
        round_id=get_field(obj, "round", "int"),
        status=get_field(obj, "status", "str"),
        reason=get_field(obj, "reason", "str"),
    )
    if a.status not in ACK_STATUSES:
        raise SchemaError(f"ack: unknown status {a.status!r}")
    return a
