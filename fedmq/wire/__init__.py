"""The wire schema: every message fedmq sends, as msgpack maps with a schema version.

This package is the only place that defines message fields. Encode and decode come in
symmetric pairs; every decoder caps the size before unpacking and raises only the
`ProtocolError` family. Arrays travel as raw little-endian bytes + dtype + shape from an
allow-list. Never pickle: loading pickled bytes runs code.
"""

from fedmq.wire.framing import DTYPES, MAX_MESSAGE_BYTES, SCHEMA_VERSION
from fedmq.wire.presence import (
    DEVICE_STATUSES,
    DeviceMetrics,
    DeviceState,
    decode_metrics,
    decode_state,
    encode_metrics,
    encode_state,
)
from fedmq.wire.rounds import (
    ACK_STATUSES,
    ROUND_STATES,
    Ack,
    RoundAnnouncement,
    TrainConfig,
    Update,
    decode_ack,
    decode_round,
    decode_update,
    encode_ack,
    encode_round,
    encode_update,
    max_selected_ids,
)
from fedmq.wire.tensors import (
    TensorSpec,
    check_tensors,
    decode_array,
    decode_weights,
    encode_array,
    encode_weights,
    specs_of,
)
from fedmq.wire.transfer import (
    CHUNK_OVERHEAD,
    Chunk,
    DeltaRef,
    Manifest,
    PayloadRef,
    decode_chunk,
    decode_manifest,
    encode_chunk,
    encode_manifest,
)

__all__ = [
    "ACK_STATUSES",
    "Ack",
    "CHUNK_OVERHEAD",
    "Chunk",
    "DEVICE_STATUSES",
    "DTYPES",
    "DeviceMetrics",
    "DeviceState",
    "MAX_MESSAGE_BYTES",
    "DeltaRef",
    "Manifest",
    "PayloadRef",
    "ROUND_STATES",
    "RoundAnnouncement",
    "SCHEMA_VERSION",
    "TensorSpec",
    "TrainConfig",
    "Update",
    "check_tensors",
    "decode_ack",
    "decode_array",
    "decode_chunk",
    "decode_manifest",
    "decode_metrics",
    "decode_round",
    "decode_state",
    "decode_update",
    "decode_weights",
    "encode_ack",
    "encode_array",
    "encode_chunk",
    "encode_manifest",
    "encode_metrics",
    "encode_round",
    "encode_state",
    "encode_update",
    "encode_weights",
    "max_selected_ids",
    "specs_of",
]
