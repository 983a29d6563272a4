"""Host math behind the kernels' ``fast`` mode: how this CPU computes, never what the chip costs.

The emulated cycles come from the tiled programs' schedules; the functions here only decide
how quickly the host produces the same numbers, and make those numbers the same on every
x86-64 host. Three things matter:

* **One summation order, on any CPU.** The emulator is a reference: the same compiled model and
  prompt must give the same tokens everywhere, and bf16 numerics round every stored activation,
  so a last-bit difference in an fp32 sum can flip a rounding and then a greedy token. BLAS
  picks its kernel (and so its summation order) by CPU, and compilers reassociate sums by the
  vector width they target. So every product here sums in one documented order, written out in
  explicit LLVM vector instructions (``LANES`` wide whatever the CPU's registers: LLVM splits
  them into what the target has, lane by lane, which does not change a lane's value), with no
  fast-math flags (no reassociation, no fused multiply-add: each product is rounded to fp32,
  then added). The order of ``out[m, n] = sum_k a[m, k] * w[k, n]``:

      lane j (0 <= j < 16):  l_j = (...((+0 + a[j] w[j]) + a[16+j] w[16+j]) + a[32+j] w[32+j]) ...)
      out = (...((l_0 + l_1) + l_2) ... ) + l_15

  (every ``+`` and product in fp32; a lane's last term is the last k = j mod 16 below K). A
  lane's sum is never -0, so trailing zero products (K padded with zeros, or keys of zero
  attention weight after the last visible one) change nothing. ``matmul_reference``
  computes the same in NumPy; the tests hold the two equal bit for bit, with Numba targeting
  the host's CPU and a generic x86-64 one. Each output depends on its row of ``a`` and its
  column of ``w`` only, never on how many rows are computed at once or how they are tiled:
  a prefill chunk's valid rows equal the padded chunk's (``gemma3/host_step.py``).
* **One thread pool at a time.** Numba's parallel loops (OpenMP threads) and OpenBLAS keep
  their own worker threads, which spin for a while after each call; two pools alternating on
  two cores wait on each other's spinning (a decode step of a few hundred small calls went
  from ~30 ms to over 800 ms that way on the default model). Products run on Numba's threads,
  over blocks of output columns (the GeGLU MLP's activation inside its gate and up products'
  loop, ``npu_kernels/mlp.py``), as do the bf16 rounding of large arrays
  (``npu_emulator/bf16.py``), RMSNorm's rows and the prefill softmax's rows; the other
  elementwise kernels run on the calling thread.
* **No library calls in the elementwise maths.** exp, tanh and GELU are fixed sequences of fp32
  operations (``npu_emulator/fixedmath.py``), not the C library's: the same bits on any host,
  and loops around them vectorise.
* **Weight bytes.** Decoding streams every weight once per token. Weights may be held in
  bfloat16 (what the chip stores; exact under bf16 numerics) and are widened to fp32 in
  registers (the fp32 word's upper half), ``LANES`` at a time: half the memory traffic of fp32
  weights. The products read ``w`` as the rows of ``w.T`` (column-major ``w``, as the model
  holds its matrices): each output is one contiguous stream per operand.
* **Many rows** (prefill, more than ``SMALL_M``): outputs in 4 x 4 register tiles; a tile's
  four bf16 weight rows are widened once into an fp32 buffer (L1) that all its row tiles read,
  and a tile's 16 lane vectors are summed together: transposed by shuffles, so that one
  vector holds lane l of every output, then added lane after lane (the order above, exactly).

``matmul(a, w)`` is the entry point: ``a`` (M, K) fp32 times ``w`` (K, N) fp32 or bfloat16,
column-major (the transposed view of a C-ordered (N, K) array: the model's matrices and the
tied embedding read as the LM head) or C-ordered (transposed to column-major per call).
"""

from __future__ import annotations

import ml_dtypes
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from npu_emulator.bf16 import from_bits

BF16 = np.dtype(ml_dtypes.bfloat16)
LANES = 16  # partial sums per output (the summation order above; not the CPU's vector width)
SMALL_M = 16  # rows: up to this many (decode), each output streams its weights on its own
TILE_M, TILE_N = 4, 4  # more rows (prefill): outputs in 4 x 4 register tiles, sharing loads
_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


def is_bf16(a: np.ndarray) -> bool:
    return a.dtype == BF16


def as_f32(a: np.ndarray) -> np.ndarray:
    """fp32 values of ``a`` (a no-copy view when it is already fp32)."""
    return np.asarray(a, dtype=np.float32)


def _held(w: np.ndarray) -> np.ndarray:
    """What the Numba kernels read: bf16 as its bits (uint16), else fp32."""
    return w.view(np.uint16) if is_bf16(w) else np.asarray(w, np.float32)


def _lane_sum(builder, acc):
    """(...((l_0 + l_1) + l_2) ...) + l_15 of one vector of lanes."""
    total = builder.extract_element(acc, ir.Constant(_I32, 0))
    for lane in range(1, LANES):
        total = builder.fadd(total, builder.extract_element(acc, ir.Constant(_I32, lane)))
    return total


def _lane_sums(builder, accs):
    """``_lane_sum`` of each of ``LANES`` vectors, as one vector (lane o: vector o's sum):
    transposed by a butterfly (stage d swaps bit d of the lane and vector indices), then the
    vectors added in lane order, lane o of each addition in the order of ``_lane_sum``."""
    vs = list(accs)
    distance = LANES // 2
    while distance:
        low = ir.Constant(
            ir.VectorType(_I32, LANES), [LANES + p - distance if p & distance else p for p in range(LANES)]
        )
        high = ir.Constant(
            ir.VectorType(_I32, LANES), [LANES + p if p & distance else p + distance for p in range(LANES)]
        )
        new = list(vs)
        for i in range(LANES):
            if not i & distance:
                new[i] = builder.shuffle_vector(vs[i], vs[i + distance], low)
                new[i + distance] = builder.shuffle_vector(vs[i], vs[i + distance], high)
        vs = new
        distance //= 2
    total = vs[0]
    for v in vs[1:]:
        total = builder.fadd(total, v)
    return total


def _dot_tile(rows: int, cols: int):
    """An intrinsic ``tile(a, wt, out, m0, n0)``: out[m0 + i, n0 + j] = a[m0 + i] . wt[n0 + j]
    for i < rows, j < cols, in the fixed order of the module docstring. a (M, K) fp32 and
    wt (N, K) fp32 or bf16 bits (uint16), rows C-contiguous; the tile shares each loaded
    ``LANES``-vector of a among its columns and of wt among its rows."""

    @intrinsic
    def tile(typingctx, a, wt, out, m0, n0):
        def codegen(context, builder, sig, args):
            a_ty, w_ty, o_ty = sig.args[:3]
            a_, w_, o_ = (context.make_array(t)(context, builder, v) for t, v in zip(sig.args[:3], args[:3]))
            m0_, n0_ = args[3], args[4]
            k_len = builder.extract_value(a_.shape, 1)
            vec = ir.VectorType(_F32, LANES)
            bf16 = w_ty.dtype == types.uint16
            held = ir.VectorType(ir.IntType(16), LANES) if bf16 else vec
            zero = ir.Constant(_I64, 0)

            def row(ty, arr, first, i):
                index = builder.add(first, ir.Constant(_I64, i))
                return cgutils.get_item_pointer(context, builder, ty, arr, [index, zero])

            def widen(v, to):  # bf16 bits -> the fp32 word whose upper half they are
                if not bf16:
                    return v
                bits = ir.VectorType(_I32, LANES) if isinstance(to, ir.VectorType) else _I32
                sixteen = ir.Constant(bits, [16] * LANES if bits is not _I32 else 16)
                return builder.bitcast(builder.shl(builder.zext(v, bits), sixteen), to)

            xs = [row(a_ty, a_, m0_, i) for i in range(rows)]
            ws = [row(w_ty, w_, n0_, j) for j in range(cols)]
            lanes = [[cgutils.alloca_once_value(builder, ir.Constant(vec, None)) for _ in ws] for _ in xs]
            whole = builder.sub(k_len, builder.srem(k_len, ir.Constant(_I64, LANES)))
            with cgutils.for_range_slice(builder, zero, whole, ir.Constant(_I64, LANES)) as (k, _):
                xv = [
                    builder.load(builder.bitcast(builder.gep(p, [k]), vec.as_pointer()), align=4) for p in xs
                ]
                wv = [
                    widen(builder.load(builder.bitcast(builder.gep(p, [k]), held.as_pointer()), align=2), vec)
                    for p in ws
                ]
                for i, x in enumerate(xv):
                    for j, w in enumerate(wv):
                        acc = lanes[i][j]
                        builder.store(builder.fadd(builder.load(acc), builder.fmul(x, w)), acc)
            for i, x_ptr in enumerate(xs):
                for j, w_ptr in enumerate(ws):
                    # The last partial block: k = whole + lane into its lane, as a zero-padded block.
                    with cgutils.for_range_slice(builder, whole, k_len, ir.Constant(_I64, 1)) as (k, _):
                        product = builder.fmul(
                            builder.load(builder.gep(x_ptr, [k])),
                            widen(builder.load(builder.gep(w_ptr, [k])), _F32),
                        )
                        lane = builder.trunc(builder.sub(k, whole), _I32)
                        acc = builder.load(lanes[i][j])
                        total = builder.fadd(builder.extract_element(acc, lane), product)
                        builder.store(builder.insert_element(acc, total, lane), lanes[i][j])
            accs = [builder.load(lanes[i][j]) for i in range(rows) for j in range(cols)]
            if len(accs) == LANES:
                # As many outputs as lanes: transpose the tile's lane vectors (a butterfly of
                # shuffles), so that vector l holds lane l of every output, then add the vectors
                # in lane order: output o is (...((l_0 + l_1) + l_2) ...) + l_15, the same sums.
                totals = _lane_sums(builder, accs)
                accs = [builder.extract_element(totals, ir.Constant(_I32, o)) for o in range(LANES)]
            else:
                accs = [_lane_sum(builder, acc) for acc in accs]
            for i in range(rows):
                for j in range(cols):
                    m = builder.add(m0_, ir.Constant(_I64, i))
                    n = builder.add(n0_, ir.Constant(_I64, j))
                    ptr = cgutils.get_item_pointer(context, builder, o_ty, o_, [m, n])
                    builder.store(accs[i * cols + j], ptr)
            return context.get_dummy_value()

        return types.void(a, wt, out, types.intp, types.intp), codegen

    return tile


_dot_1x1 = _dot_tile(1, 1)
_dot_1xn = _dot_tile(1, TILE_N)
_dot_mx1 = _dot_tile(TILE_M, 1)
_dot_mxn = _dot_tile(TILE_M, TILE_N)


@numba.njit(cache=True, inline="always")
def _mm_columns(a, wt, out, n0, n1):
    """out[:, n0:n1] = a (M, K) @ wt[n0:n1].T. Up to SMALL_M rows each output streams its
    weight row on its own (the rows re-read it from L1); more rows go in register tiles."""
    m_rows = a.shape[0]
    tiled = m_rows > SMALL_M
    m_end = m_rows - m_rows % TILE_M if tiled else 0
    n_end = n1 - (n1 - n0) % TILE_N if tiled else n0
    widened = tiled and wt.itemsize == 2
    if widened:  # bf16: a tile's weight rows widened once, not once per tile of rows
        wide = np.empty((TILE_N, wt.shape[1]), np.float32)
        for r in range(n0, n_end, TILE_N):
            for j in range(TILE_N):
                for k in range(wt.shape[1]):
                    wide[j, k] = from_bits(np.uint32(wt[r + j, k]) << np.uint32(16))
            cols = out[:, r : r + TILE_N]
            for m in range(0, m_end, TILE_M):
                _dot_mxn(a, wide, cols, m, 0)
            for m in range(m_end, m_rows):
                _dot_1xn(a, wide, cols, m, 0)
    for r in range(n0, n0 if widened else n_end, TILE_N):
        for m in range(0, m_end, TILE_M):
            _dot_mxn(a, wt, out, m, r)
        for m in range(m_end, m_rows):
            _dot_1xn(a, wt, out, m, r)
    for r in range(n_end, n1):
        for m in range(0, m_end, TILE_M):
            _dot_mx1(a, wt, out, m, r)
        for m in range(m_end, m_rows):
            _dot_1x1(a, wt, out, m, r)


@numba.njit(parallel=True, cache=True)
def _mm_nt(a, wt, out, block):
    """out (M, N) = a (M, K) @ wt.T, wt (N, K) C-ordered (fp32 or bf16 bits): blocks of
    ``block`` output columns in parallel."""
    n = wt.shape[0]
    for b in numba.prange((n + block - 1) // block):
        _mm_columns(a, wt, out, b * block, min(n, (b + 1) * block))


@numba.njit(parallel=True, cache=True)
def _mm_nt_pair(a, wt0, wt1, out0, out1, block):
    """``_mm_nt`` of two weights sharing ``a`` in one parallel loop (one fork and join)."""
    n0, n1 = wt0.shape[0], wt1.shape[0]
    first = (n0 + block - 1) // block
    for b in numba.prange(first + (n1 + block - 1) // block):
        if b < first:
            _mm_columns(a, wt0, out0, b * block, min(n0, (b + 1) * block))
        else:
            c = b - first
            _mm_columns(a, wt1, out1, c * block, min(n1, (c + 1) * block))


@numba.njit(cache=True)
def block_columns(n, unit, cap, threads):
    """Columns per parallel block of n on ``threads`` threads: about four blocks per thread
    (balance), whole multiples of ``unit``, at most ``cap`` (and at least ``unit``)."""
    per = -(-n // (4 * threads))
    return max(unit, min(cap, -(-per // unit) * unit))


def _block(n: int, unit: int, cap: int) -> int:
    """``block_columns`` on Numba's threads."""
    return block_columns(n, unit, cap, numba.get_num_threads())


def transposed(w: np.ndarray) -> bool:
    """Whether ``w`` is the transposed view of a C-ordered array (column-major)."""
    return w.ndim == 2 and not w.flags.c_contiguous and w.T.flags.c_contiguous


def column_major(w: np.ndarray, dtype=None) -> np.ndarray:
    """``w`` (K, N) held column-major: the (K, N) view of a C-ordered (N, K) copy, optionally
    cast (to ``BF16``). Products with few rows then read each output's weights contiguously."""
    return np.ascontiguousarray(w.T, dtype=dtype).T


def matmul(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``a @ w`` in fp32, summed in the fixed order of the module docstring: a (M, K) fp32,
    w (K, N) fp32 or bf16, column-major (streamed as held) or C-ordered (transposed first)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.ndim != 2 or w.ndim != 2 or a.shape[1] != w.shape[0]:
        raise ValueError(f"matmul: a {a.shape} and w {w.shape} do not chain as (M, K) @ (K, N)")
    wt = _held(np.ascontiguousarray(w.T))  # (N, K): no copy when w is column-major
    out = np.empty((a.shape[0], wt.shape[0]), np.float32)
    _mm_nt(a, wt, out, _block(wt.shape[0], TILE_N, 4096 if a.shape[0] <= SMALL_M else 256))
    return out


def matmul_pair(a: np.ndarray, w0: np.ndarray, w1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(matmul(a, w0), matmul(a, w1))`` in one parallel loop: the same bits, one thread-pool
    fork and join instead of two (a GeGLU MLP's gate and up projections)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    for w in (w0, w1):
        if a.ndim != 2 or w.ndim != 2 or a.shape[1] != w.shape[0]:
            raise ValueError(f"matmul: a {a.shape} and w {w.shape} do not chain as (M, K) @ (K, N)")
    wts = [_held(np.ascontiguousarray(w.T)) for w in (w0, w1)]
    if wts[0].dtype != wts[1].dtype:
        return matmul(a, w0), matmul(a, w1)
    outs = [np.empty((a.shape[0], wt.shape[0]), np.float32) for wt in wts]
    n = wts[0].shape[0] + wts[1].shape[0]
    _mm_nt_pair(a, *wts, *outs, _block(n, TILE_N, 4096 if a.shape[0] <= SMALL_M else 256))
    return outs[0], outs[1]


def matmul_reference(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``matmul`` in NumPy, in the same order (module docstring), to check it bit for bit:
    K zero-padded to whole ``LANES`` blocks, fp32 products summed block by block into the
    lanes, then the lanes added in order. NumPy's fp32 elementwise ``*`` and ``+`` round each
    result, as the kernel does (the padding's zero products change no lane: module docstring)."""
    a = np.asarray(a, np.float32)
    w = np.asarray(w, np.float32)
    k_len = a.shape[1]
    padded = -(-k_len // LANES) * LANES
    a = np.pad(a, ((0, 0), (0, padded - k_len)))
    w = np.pad(w, ((0, padded - k_len), (0, 0)))
    lanes = np.zeros((a.shape[0], w.shape[1], LANES), np.float32)
    for k0 in range(0, padded, LANES):
        lanes += a[:, None, k0 : k0 + LANES] * w[k0 : k0 + LANES].T[None]
    out = lanes[:, :, 0].copy()
    for j in range(1, LANES):
        out += lanes[:, :, j]
    return out
