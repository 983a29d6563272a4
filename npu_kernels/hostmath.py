"""Host math behind the kernels' ``fast`` mode: how this CPU computes, never what the chip costs.

The emulated cycles come from the tiled programs' schedules; the functions here only decide
how quickly the host produces the same numbers. Two things matter on a small CPU:

* **One thread pool at a time.** Numba's parallel loops (OpenMP threads) and OpenBLAS keep
  their own worker threads, which spin for a while after each call; two pools alternating on
  two cores wait on each other's spinning (a decode step of a few hundred small calls went
  from ~30 ms to over 800 ms that way on the default model). So the elementwise kernels run on the calling thread
  (they are cheap next to the products), products with many rows (prefill) use BLAS's
  threads, and products with few rows (decode) and decode attention use Numba's.
* **Weight bytes.** Decoding streams every weight once per token. Weights may be held in
  bfloat16 (what the chip stores; exact under bf16 numerics) and are widened to fp32 a cache
  line at a time inside the kernels, which accumulate in fp32: half the memory traffic of
  fp32 weights.

``matmul(a, w)`` is the entry point: ``a`` (M, K) fp32 times ``w`` (K, N) fp32 or bfloat16,
C-ordered or the transposed view of a (N, K) array (the tied embedding read as the LM head).
"""

from __future__ import annotations

import ml_dtypes
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

BF16 = np.dtype(ml_dtypes.bfloat16)
SMALL_M = 16  # rows: up to this many, products stream the weights in Numba (decode)
_REASSOC = {"reassoc", "contract"}  # fp32 sums may be reordered (vectorised), as BLAS does


def is_bf16(a: np.ndarray) -> bool:
    return a.dtype == BF16


def as_f32(a: np.ndarray) -> np.ndarray:
    """fp32 values of ``a`` (a no-copy view when it is already fp32)."""
    return np.asarray(a, dtype=np.float32)


@intrinsic
def _f32_bits(typingctx, bits):
    """Reinterpret int32 bits as a float32 (an LLVM bitcast: vectorises, unlike array views)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


def _value(x):
    """The fp32 value of one weight as held: fp32 as is, bfloat16 bits (uint16) widened."""
    raise NotImplementedError  # only called from Numba code: see the overload below


@overload(_value, inline="always")
def _value_typed(x):
    if x == types.uint16:  # bf16 bits: the fp32 word's upper half
        return lambda x: _f32_bits(np.int32(np.uint32(x) << np.uint32(16)))
    return lambda x: x


def _held(w: np.ndarray) -> np.ndarray:
    """What the Numba kernels read: bf16 as its bits (uint16), else fp32."""
    return w.view(np.uint16) if is_bf16(w) else np.asarray(w, np.float32)


@numba.njit(parallel=True, cache=True, fastmath=_REASSOC)
def _mv_kn(a, w, out, block):
    """out (M, N) = a (M, K) @ w (K, N), w C-ordered (fp32 or bf16 bits); column blocks in
    parallel, each accumulating its (M, block) outputs over the K rows."""
    m_rows, k_len = a.shape
    n = w.shape[1]
    for b in numba.prange((n + block - 1) // block):
        n0 = b * block
        n1 = min(n, n0 + block)
        acc = np.zeros((m_rows, n1 - n0), np.float32)
        for k in range(k_len):
            row = w[k, n0:n1]
            for m in range(m_rows):
                x = a[m, k]
                am = acc[m]
                for j in range(n1 - n0):
                    am[j] += x * _value(row[j])
        out[:, n0:n1] = acc


@numba.njit(parallel=True, cache=True, fastmath=_REASSOC)
def _mv_nk(a, wt, out, block):
    """out (M, N) = a (M, K) @ wt.T: wt (N, K) C-ordered (row n is column n of w), so each
    output is one contiguous dot product and the weights stream in order."""
    m_rows, k_len = a.shape
    n = wt.shape[0]
    for b in numba.prange((n + block - 1) // block):
        for r in range(b * block, min(n, (b + 1) * block)):
            row = wt[r]
            for m in range(m_rows):
                am = a[m]
                s = np.float32(0.0)
                for k in range(k_len):
                    s += am[k] * _value(row[k])
                out[m, r] = s


def _block(n: int, unit: int, cap: int) -> int:
    """Columns per parallel block: about four blocks per thread (balance), at most ``cap``."""
    per = -(-n // (4 * numba.get_num_threads()))
    return max(unit, min(cap, -(-per // unit) * unit))


def transposed(w: np.ndarray) -> bool:
    """Whether ``w`` is the transposed view of a C-ordered array (column-major)."""
    return w.ndim == 2 and not w.flags.c_contiguous and w.T.flags.c_contiguous


def column_major(w: np.ndarray, dtype=None) -> np.ndarray:
    """``w`` (K, N) held column-major: the (K, N) view of a C-ordered (N, K) copy, optionally
    cast (to ``BF16``). Products with few rows then read each output's weights contiguously."""
    return np.ascontiguousarray(w.T, dtype=dtype).T


def matmul(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``a @ w`` in fp32: a (M, K) fp32, w (K, N) fp32 or bf16, C-ordered or column-major.

    At most ``SMALL_M`` rows of ``a`` (decode: bandwidth bound), Numba streams column-major
    or bf16 weights once over its threads, widening bf16 in registers; C-ordered fp32 weights
    (a kernel called on plain arrays) go to BLAS's matrix-vector product, which streams them
    faster than a column-block loop. More rows (prefill: compute bound) go to BLAS, bf16
    weights widened once per call."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    col = transposed(w)
    if a.shape[0] > SMALL_M or not (col or is_bf16(w)):
        return np.matmul(a, as_f32(w.T).T if col else as_f32(w), dtype=np.float32)
    n = w.shape[1]
    out = np.empty((a.shape[0], n), np.float32)
    if col:
        _mv_nk(a, _held(w.T), out, _block(n, 64, 4096))
    else:
        _mv_kn(a, _held(np.ascontiguousarray(w)), out, _block(n, 64, 1024))
    return out
