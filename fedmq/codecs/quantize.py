"""Value codecs: float16 and int8 with stochastic rounding, as pure numpy.

Error bounds (per element x, decoded y):
- float16: round to nearest; |y - x| <= 2**-11 * |x| for |x| >= 2**-14, <= 2**-25 below
  that; |x| > 65504 cannot be represented and is refused (ValueError) rather than sent as inf.
- int8: per block of B consecutive values (B = 0: one block for the whole tensor) a float32
  scale s = max|x| / 127; q = floor(x / s + u) with u ~ U[0, 1), so |y - x| < s and
  E[y] = x (unbiased): averaging many devices' updates cancels the rounding noise.
"""

from __future__ import annotations

import numpy as np

FLOAT16_MAX = float(np.finfo(np.float16).max)
INT8_LEVELS = 127


def to_float16(x: np.ndarray) -> np.ndarray:
    """x rounded to the nearest float16; ValueError if any value is outside float16's range."""
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak > FLOAT16_MAX:
        raise ValueError(f"a value of magnitude {peak:.3g} does not fit float16 (max 65504)")
    return x.astype(np.float16)


def num_blocks(size: int, block: int) -> int:
    """How many scale blocks a tensor of `size` values has (block 0: one per tensor)."""
    if block == 0 or size == 0:
        return 1
    return -(-size // block)


def quantize_int8(
    x: np.ndarray, *, block: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes, float32 scale per block) of x, flattened, with stochastic rounding."""
    flat = np.asarray(x, dtype=np.float32).reshape(-1)
    n = flat.size
    b = n if block == 0 else block
    nb = num_blocks(n, block)
    padded = np.zeros(nb * max(b, 1), dtype=np.float32)
    padded[:n] = flat
    blocks = padded.reshape(nb, max(b, 1))
    scales = (np.max(np.abs(blocks), axis=1) / INT8_LEVELS).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1.0))
    u = rng.random(blocks.shape, dtype=np.float32)
    q = np.floor(blocks / safe[:, None] + u)
    codes = np.clip(q, -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
    return codes.reshape(-1)[:n], scales


def dequantize_int8(codes: np.ndarray, scales: np.ndarray, *, block: int) -> np.ndarray:
    """Flat float32 values from int8 codes and their per-block scales."""
    n = codes.size
    with np.errstate(over="ignore"):  # a hostile scale overflows to inf; the caller checks
        if block == 0 or n == 0:
            return codes.astype(np.float32) * scales[0]
        # index, not np.repeat(scales, block): a huge block from the wire must cost O(n) only
        per_value = scales[np.arange(n) // block]
        return codes.astype(np.float32) * per_value
