"""Top-k sparsification and the compact index format of sparse tensors, as pure numpy.

A sparse tensor sends k of its n values (the largest in magnitude) and their positions.
Positions go on the wire as gaps between sorted flat indices (the first one absolute),
as uint16 when every gap fits, else uint32; zstd compresses the small gaps well.
The values that are not sent stay on the device as its error-feedback residual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SparseTensor:
    """k values of a tensor of `shape` at sorted, unique flat `indices`; zero elsewhere."""

    shape: tuple[int, ...]
    indices: np.ndarray  # int64, strictly increasing, < prod(shape)
    values: np.ndarray  # float32, same length

    def to_dense(self) -> np.ndarray:
        """The full tensor (tests, residuals and the device's own check, never the sum)."""
        out = np.zeros(int(np.prod(self.shape, dtype=np.int64)), dtype=np.float32)
        out[self.indices] = self.values
        return out.reshape(self.shape)


def topk_count(size: int, fraction: float) -> int:
    """How many values a tensor of `size` keeps at `fraction` (at least one)."""
    return max(1, min(size, math.ceil(fraction * size))) if size else 0


def topk_sparsify(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted flat indices, values) of the k entries of x largest in magnitude."""
    flat = np.asarray(x, dtype=np.float32).reshape(-1)
    if k >= flat.size:
        idx = np.arange(flat.size, dtype=np.int64)
    else:
        idx = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :])
        idx = idx.astype(np.int64)
    return idx, flat[idx]


def encode_indices(indices: np.ndarray) -> tuple[str, bytes]:
    """Sorted unique indices as (dtype name, little-endian gap bytes)."""
    gaps = np.diff(indices, prepend=0) if indices.size else np.zeros(0, dtype=np.int64)
    dtype = "uint16" if (gaps.size == 0 or int(gaps.max()) < 1 << 16) else "uint32"
    return dtype, gaps.astype("<u2" if dtype == "uint16" else "<u4").tobytes()


def decode_indices(gaps: np.ndarray, size: int) -> np.ndarray | None:
    """Flat indices from gaps, or None unless they are strictly increasing and < size."""
    idx = np.cumsum(gaps.astype(np.int64))
    if idx.size == 0:
        return idx
    if idx.size > 1 and int(gaps[1:].min()) < 1:
        return None
    if int(idx[-1]) >= size:
        return None
    return idx
