"""bfloat16 rounding in jitted code: ``memory.round_bf16``'s values (ml_dtypes' float32 ->
bfloat16 -> float32 round trip: nearest, ties to even; a NaN becomes the quiet NaN of its
sign), bit for bit, as integer operations on the float32 bits.

``round_value`` rounds one value inside Numba code (the host's kernels round their stored
intermediates with it: ``npu_kernels/hostmath.py``, ``gemma3/host_fused.py``); ``round_array``
rounds a C-ordered array on Numba's threads (``memory.round_bf16`` uses it for large arrays:
every bf16 tensor written under bf16 numerics goes through it)."""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic


@intrinsic
def _bits(typingctx, v):
    """The bits of a float32 as a uint32."""

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def from_bits(typingctx, v):
    """The float32 whose bits are the uint32 ``v``."""

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@numba.njit(cache=True, inline="always")
def round_value(v, bf16):
    """``v`` (float32) as a bf16 tensor holds it when ``bf16``, else ``v``."""
    if not bf16:
        return v
    b = np.uint32(_bits(v))
    if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN: the quiet NaN of its sign
        return from_bits(np.uint32((b & np.uint32(0x80000000)) | np.uint32(0x7FC00000)))
    up = np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))
    return from_bits(np.uint32((b + up) & np.uint32(0xFFFF0000)))


@numba.njit(parallel=True, cache=True)
def _round_into(src, dst, bf16):
    for i in numba.prange(src.shape[0]):
        dst[i] = round_value(src[i], bf16)


def round_array(x: np.ndarray, bf16: bool = True) -> np.ndarray:
    """``round_value`` of every value of ``x``, as a new C-ordered float32 array."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    _round_into(x.reshape(-1), out.reshape(-1), bf16)
    return out
