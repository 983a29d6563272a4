"""Multi-LoRA: a projection's output plus the low-rank product of the adapter each row group uses.

``out = y + (x @ A[ids[g]]) @ B[ids[g]]^T`` for the rows of group g (peft's ``lora_B(lora_A(x))``
with the scale folded into B at compile time, as Optimum RBLN folds it).

IO (DRAM, device dtype unless said): x (T, Din); y (T, Dout) the base projection's output;
a (N, Din, R): every adapter's A, transposed to (in, rank); b (N, Dout, R): every adapter's
B as peft stores it (out, rank), times the adapter's scale; ids (G,) int32 in [0, N): the
adapter of each group of T / G consecutive rows (a decode step: one row per sequence, G = its
batch; a prefill chunk: one sequence, G = 1). N counts the reserved base adapter (id 0, all
zeros); every adapter is zero-padded to the common rank R (``max_lora_rank``).
out (T, Dout) in y's dtype. No compile-time constants besides an optional ``plan``.

Plan: a work unit is one row block (at most ``matmul_max_m`` rows) of one group, a group cut
into enough blocks to reach every engine, and, when there are fewer blocks than engines (a
decode step), one block of the output columns; units go to the engines round robin. Each engine loads its group's id into local SRAM (on a queue its
gathers do not use), then per unit:

* A phase: for each tile of ``kt`` input columns, the x tile by DMA and the adapter's
  (kt, R) slice of A by an indirect load (``k.gather`` of row ids[g] of A viewed as
  (N, Din * R), only the tile's columns), accumulated on the matrix unit into u (rows, R) in
  fp32; u is cast to the device dtype (the vector unit), as the second product reads it.
* B phase: for each tile of ``jt`` output columns, the (jt, R) slice of B by an indirect load
  (B viewed as (N, Dout * R)), ``u @ slice^T`` on the matrix unit (the slice read through a
  transposed view), y's tile added on the vector unit in fp32, the sum stored in y's dtype.

Buffers are double-buffered (``depth``), so gathers and loads overlap the products.
SRAM per engine: depth x (x tile + A tile + B tile + y tile + out tiles) + u.
FLOPs: 2 T R (Din + Dout) on the matrix unit (x @ A once more per extra column block);
T Dout vector adds.
DRAM bytes: the A of the adapters read once per unit, their B once per row block, x and y
read, out written:
a decode step reads each selected adapter's (Din + Dout) R weights, not the base weights again.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from npu_emulator import Kernel, KernelError, as_stored
from npu_emulator.memory import itemsize
from npu_emulator.program import ceil_div, tiles

from .common import Operand, index_queue, interleave, load_store_queues, split, stream_rows
from .matmul import bias_activation_fast, gelu_tanh_reference


def lora_reference(x, y, a, b, ids, **_) -> np.ndarray:
    x, a, b = (np.asarray(v, np.float64) for v in (x, a, b))
    rows = np.repeat(np.asarray(ids), x.shape[0] // len(ids))  # adapter of each row
    u = np.einsum("ti,tir->tr", x, a[rows])
    return np.asarray(y, np.float64) + np.einsum("tr,tor->to", u, b[rows])


def _check(x_shape, y_shape, a_shape, b_shape, ids_shape):
    if (
        len(x_shape) != 2
        or len(y_shape) != 2
        or len(a_shape) != 3
        or len(b_shape) != 3
        or len(ids_shape) != 1
    ):
        raise KernelError(
            f"lora: x must be (T, Din), y (T, Dout), a (N, Din, R), b (N, Dout, R) and ids (G,); got "
            f"{x_shape}, {y_shape}, {a_shape}, {b_shape}, {ids_shape}"
        )
    (t, din), (n, din2, r), (n2, dout, r2) = x_shape, a_shape, b_shape
    if din2 != din or n2 != n or r2 != r or y_shape != (t, dout):
        raise KernelError(
            f"lora: shapes do not chain: x {x_shape}, y {y_shape}, a {a_shape} (N, Din, R), "
            f"b {b_shape} (N, Dout, R)"
        )
    g = ids_shape[0]
    if g < 1 or t % g:
        raise KernelError(f"lora: {t} rows do not split into {g} groups of equal size (one id per group)")


def lora_fast(x, y, a, b, ids, *, numerics: str = "fp32", **_) -> np.ndarray:
    _check(x.shape, y.shape, a.shape, b.shape, ids.shape)
    ids = np.asarray(ids, np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= a.shape[0]):
        raise KernelError(f"lora: ids must lie in [0, {a.shape[0]}), got {ids.min()}..{ids.max()}")
    s = x.shape[0] // len(ids)
    out = np.array(y, np.float32)
    for g, n in enumerate(ids):
        rows = slice(g * s, (g + 1) * s)
        u = as_stored(np.asarray(x[rows], np.float32) @ np.asarray(a[n], np.float32), numerics)
        out[rows] += u @ np.asarray(b[n], np.float32).T
    return out


@dataclass(frozen=True)
class LoraPlan:
    kt: int  # input columns per A tile
    jt: int  # output columns per B tile
    depth: int = 2  # buffers per streamed operand


def _fits(cfg, rows, r, esz, p: LoraPlan) -> bool:
    tiles_ = rows * p.kt + p.kt * r + p.jt * r + rows * p.jt  # x, A, B, y tiles (device dtype)
    acc = 4 * rows * p.jt * 2 + 4 * rows * r  # out accumulator and sum (fp32), u (fp32)
    padding = (5 * p.depth + 4) * cfg.sram_alignment
    return p.depth * tiles_ * esz + acc * p.depth + esz * rows * r + padding <= cfg.local_sram_bytes


@functools.lru_cache(maxsize=256)
def choose_plan(cfg, rows: int, din: int, dout: int, r: int, dtype: str = "bf16") -> LoraPlan:
    if r > min(cfg.matmul_max_n, cfg.matmul_max_k):
        raise KernelError(
            f"lora: rank {r} exceeds the matrix unit's limits (N {cfg.matmul_max_n}, K {cfg.matmul_max_k})"
        )
    esz = itemsize(dtype)
    widest = max(1, cfg.vector_max_elements // rows)  # output columns one vector add may cover
    for kt in (min(din, cfg.matmul_max_k), cfg.mac_rows):
        for jt in (min(dout, cfg.matmul_max_n, widest), min(cfg.mac_cols, widest)):
            p = LoraPlan(min(kt, din), min(jt, dout))
            if _fits(cfg, rows, r, esz, p):
                return p
    raise KernelError(f"lora: no tile of {rows} rows at rank {r} fits {cfg.local_sram_bytes} B of local SRAM")


def lora_emit(k, x, y, a, b, ids, *, plan: LoraPlan | None = None):
    _check(x.shape, y.shape, a.shape, b.shape, ids.shape)
    if ids.dtype != "int32":
        raise KernelError(f"lora: ids must be int32, got {ids.dtype}")
    cfg = k.config
    (t, din), (n, dout, r), g = x.shape, b.shape, ids.shape[0]
    s = t // g
    # Row blocks within the matrix unit's M limit, and enough of them that a one-group prefill
    # chunk spreads over the engines (each block reads its adapter's A and B: small beside x).
    blocks = max(ceil_div(s, cfg.matmul_max_m), min(s, cfg.num_engines // g))
    block = ceil_div(s, blocks)
    p = plan or choose_plan(cfg, block, din, dout, r, x.dtype)
    out = k.output((t, dout), y.dtype, name="out")
    rows = [(gi, gi * s + r0, rl) for gi in range(g) for r0, rl in split(s, blocks)]
    # Fewer row blocks than engines (a decode step): the output columns are split too, each
    # engine computing the whole u of its rows and its columns of u @ B^T, so that every engine
    # and its DMA queues share the adapter's bytes.
    cols = split(dout, max(1, min(cfg.num_engines // len(rows), ceil_div(dout, cfg.mac_cols))))
    units = [(gi, r0, rl, c0, cw) for gi, r0, rl in rows for c0, cw in cols]
    a2, b2 = a.reshape(n, din * r), b.reshape(n, dout * r)  # one row per adapter: the gathers' tables
    # Compulsory traffic: x, y and out once, the A and B of each unit's adapter.
    k.set_roofline_bytes(
        (t * din + 2 * t * dout) * itemsize(x.dtype)
        + len(rows) * (len(cols) * din + dout) * r * itemsize(a.dtype)
        + 4 * g
    )
    engines = min(len(units), cfg.num_engines)
    programs = [
        _engine_program(k, e, x, y, a2, b2, ids, out, units[e::engines], r, p) for e in range(engines)
    ]
    interleave(programs)
    return out


def _engine_program(k, e, x, y, a2, b2, ids, out, units, r, p: LoraPlan):
    cfg = k.config
    lq, sq = load_store_queues(cfg, e)
    iq = index_queue(cfg, lq, sq)
    rows_max = max(u[2] for u in units)
    din = x.shape[1]
    dt = x.dtype
    idx = k.alloc((1,), "int32", engine=e, name=f"id_e{e}")
    u = k.alloc((rows_max, r), "fp32", engine=e, name=f"u_e{e}")
    uc = k.alloc((rows_max, r), dt, engine=e, name=f"uc_e{e}")
    d = p.depth
    xs = [k.alloc((rows_max, p.kt), dt, engine=e, name=f"x{i}_e{e}") for i in range(d)]
    at = [k.alloc((p.kt, r), a2.dtype, engine=e, name=f"a{i}_e{e}") for i in range(d)]
    bt = [k.alloc((p.jt, r), b2.dtype, engine=e, name=f"b{i}_e{e}") for i in range(d)]
    ys = [k.alloc((rows_max, p.jt), y.dtype, engine=e, name=f"y{i}_e{e}") for i in range(d)]
    acc = [k.alloc((rows_max, p.jt), "fp32", engine=e, name=f"acc{i}_e{e}") for i in range(d)]
    os_ = [k.alloc((rows_max, p.jt), y.dtype, engine=e, name=f"o{i}_e{e}") for i in range(d)]
    step = 0
    for gi, r0, rl, c0, cw in units:
        k.dma(idx, ids[gi : gi + 1], queue=iq)
        for i, (k0, kl) in enumerate(tiles(din, p.kt)):
            sl = step % d
            q = lq[step % len(lq)]
            k.dma(xs[sl][:rl, :kl], x[r0 : r0 + rl, k0 : k0 + kl], queue=q)
            ta = at[sl][:kl]
            k.gather(ta.reshape(1, kl * r), a2[:, k0 * r : (k0 + kl) * r], idx, queue=q)
            k.matmul(u[:rl], xs[sl][:rl, :kl], ta, accumulate=i > 0)
            step += 1
            yield
        k.vector("copy", uc[:rl], u[:rl])  # the cast: the second product reads u in the device dtype
        for j0, jl in ((c0 + j, jl) for j, jl in tiles(cw, p.jt)):
            sl = step % d
            q = lq[step % len(lq)]
            tb = bt[sl][:jl]
            k.gather(tb.reshape(1, jl * r), b2[:, j0 * r : (j0 + jl) * r], idx, queue=q)
            k.dma(ys[sl][:rl, :jl], y[r0 : r0 + rl, j0 : j0 + jl], queue=q)
            k.matmul(acc[sl][:rl, :jl], uc[:rl], tb.region(0, (r, jl), (1, r)))  # u @ B_tile^T
            k.vector("add", os_[sl][:rl, :jl], acc[sl][:rl, :jl], ys[sl][:rl, :jl])
            k.dma(out[r0 : r0 + rl, j0 : j0 + jl], os_[sl][:rl, :jl], queue=sq[step % len(sq)])
            step += 1
            yield


# ----------------------------------------------------------------- the GeGLU epilogue, unfused
# A layer whose MLP an adapter targets runs gate and up as separate matmuls (each plus its
# adapter), then this: h (T, F) = gelu_tanh(gate) * up, as the fused MLP's epilogue computes it.


def geglu_combine_reference(gate, up, **_) -> np.ndarray:
    return gelu_tanh_reference(np.asarray(gate, np.float64)) * np.asarray(up, np.float64)


def geglu_combine_fast(gate, up, **_) -> np.ndarray:
    if gate.shape != up.shape or gate.ndim != 2:
        raise KernelError(f"geglu_combine: gate {gate.shape} and up {up.shape} must be one (T, F) shape")
    return bias_activation_fast(np.array(gate, np.float32), None, "gelu_tanh") * np.asarray(up, np.float32)


def geglu_combine_emit(k, gate, up):
    """gate, up (T, F) -> (T, F): gelu_tanh on the SFU into fp32 scratch, the product on the
    vector unit, rows streamed over every engine (``common.stream_rows``)."""
    if gate.shape != up.shape or len(gate.shape) != 2:
        raise KernelError(f"geglu_combine: gate {gate.shape} and up {up.shape} must be one (T, F) shape")
    out = k.output(gate.shape, gate.dtype, name="out")

    def body(k, e, ins, outs, scr, consts):
        k.activation("gelu_tanh", scr["g"], ins[0])
        k.vector("mul", outs[0], scr["g"], ins[1])

    stream_rows(
        k,
        [Operand(gate.view()), Operand(up.view())],
        [out.view()],
        body,
        scratch={"g": (gate.shape[1], "fp32")},
    )
    return out


lora = Kernel("lora", lora_emit, lora_fast, lora_reference)
geglu_combine = Kernel("geglu_combine", geglu_combine_emit, geglu_combine_fast, geglu_combine_reference)

__all__ = [
    "lora",
    "lora_emit",
    "lora_fast",
    "lora_reference",
    "geglu_combine",
    "geglu_combine_reference",
    "LoraPlan",
    "choose_plan",
]
