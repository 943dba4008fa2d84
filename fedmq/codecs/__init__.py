"""Update and model codecs: float16, int8 with stochastic rounding, top-k with error
feedback, zstd; composed into a pipeline named by a string (see pipeline.py)."""

from fedmq.codecs.feedback import Compressed, compress_update
from fedmq.codecs.models import (
    ModelDelta,
    apply_model_delta,
    check_downlink,
    decode_model,
    encode_model,
    encode_model_delta,
)
from fedmq.codecs.pipeline import (
    DEFAULT_BLOCK,
    Decoded,
    Pipeline,
    decode_tensors,
    encode_tensors,
    parse_or_schema_error,
    parse_pipeline,
    to_dense,
)
from fedmq.codecs.sparse import SparseTensor, topk_sparsify

__all__ = [
    "DEFAULT_BLOCK",
    "Compressed",
    "Decoded",
    "ModelDelta",
    "Pipeline",
    "SparseTensor",
    "apply_model_delta",
    "check_downlink",
    "compress_update",
    "decode_model",
    "decode_tensors",
    "encode_model",
    "encode_model_delta",
    "encode_tensors",
    "parse_or_schema_error",
    "parse_pipeline",
    "to_dense",
    "topk_sparsify",
]
