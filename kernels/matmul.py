"""Linear / matmul: ``out (M, N) = a (M, K) @ b (K, N)``, tiled over every engine.

IO (DRAM): a (M, K) activations, b (K, N) weights in device layout (pre-transposed: K rows),
out (M, N) in ``out_dtype`` (the device dtype unless given). a and b share one float dtype.
Accumulation is fp32 on the matrix unit; the vector unit casts each finished tile.

Plan (every size from ``k.config``; chosen by ``choose_tiling``, cached per shape):

* Engines form a grid ``gm x gn``: engine (i, j) owns the rows of block i and the columns of
  block j of ``out``.
* An operand that several engines read (a when gn > 1, b when gm > 1) is staged once into
  shared SRAM, k-tile by k-tile, each k-tile split over all DMA queues so it lands as early as
  possible; engines then pull their tiles from shared SRAM instead of each reading DRAM.
* Each engine keeps its rows of a resident in local SRAM (loaded on first use) when they fit,
  and streams b in (TK, TN) tiles through ``depth`` buffers (2 = double buffering: the DMA of
  tile i+1 overlaps the matmuls on tile i). Accumulators are double-buffered across column
  tiles so the cast and write-out of one overlaps the next one's matmuls.
* Engines' programs are interleaved step by step in program order, since a DMA queue serves its
  descriptors in order.

SRAM per engine: a rows ``Mp * K`` (or ``depth`` a tiles), ``depth`` b tiles ``TK x TN``, two
fp32 accumulators ``Mp x TN`` and two output tiles ``TM x TN``; shared SRAM: the staged operands.
FLOPs: ``2 * M * K * N``. Compulsory DRAM bytes: ``(M*K + K*N) * elt + M*N * out elt``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from emulator import Kernel, KernelError
from emulator.program import KernelContext, ceil_div, tiles

DTYPE_BYTES = {"bf16": 2, "fp32": 4}


def matmul_reference(a: np.ndarray, b: np.ndarray, **_) -> np.ndarray:
    return a.astype(np.float64) @ b.astype(np.float64)


def matmul_fast(a: np.ndarray, b: np.ndarray, **_) -> np.ndarray:
    return np.matmul(a, b, dtype=np.float32)


def flops(m: int, k: int, n: int) -> int:
    """2 FLOPs (multiply, add) per multiply-add."""
    return 2 * m * k * n


@dataclass(frozen=True)
class Tiling:
    gm: int  # engine grid rows (blocks of M)
    gn: int  # engine grid columns (blocks of N)
    tk: int  # contraction tile
    tn: int  # column tile
    depth: int = 2  # b (and a) tile buffers per engine
    stage_a: bool = False  # copy a once to shared SRAM (gn > 1 engines read each row)
    stage_b: bool = False  # copy b once to shared SRAM (gm > 1 engines read each column)

    def blocks(self, cfg, m: int, n: int) -> tuple[int, int]:
        """Rows and columns per engine; columns in whole MAC-array widths."""
        mp = ceil_div(m, self.gm)
        np_ = min(n, ceil_div(ceil_div(n, cfg.mac_cols), self.gn) * cfg.mac_cols)
        return mp, np_


def _balanced(total: int, tile: int, unit: int) -> int:
    """The smallest multiple of ``unit`` that covers ``total`` in as many tiles as ``tile`` does."""
    count = ceil_div(total, tile)
    return min(tile, ceil_div(ceil_div(total, count), unit) * unit)


def _fits(cfg, m, k, n, t: Tiling, esz: int, out_esz: int) -> bool:
    mp, np_ = t.blocks(cfg, m, n)
    tm = min(mp, cfg.matmul_max_m)
    fixed = t.depth * t.tk * t.tn * esz + 2 * mp * t.tn * 4 + 2 * tm * t.tn * out_esz
    a_part = min(mp * k, t.depth * tm * t.tk) * esz
    return fixed + a_part <= cfg.local_sram_bytes


def _estimate(cfg, m, k, n, t: Tiling, esz: int) -> float:
    """Rough cycles: the slower of compute and DRAM, plus pipeline fill and drain."""
    mp, np_ = t.blocks(cfg, m, n)
    tm = min(mp, cfg.matmul_max_m)
    k_passes = sum(ceil_div(kl, cfg.mac_rows) for _, kl in tiles(k, t.tk))
    n_passes = sum(ceil_div(nl, cfg.mac_cols) for _, nl in tiles(np_, t.tn))
    m_rows = sum(max(ml, cfg.mac_rows) for _, ml in tiles(mp, tm))
    instrs = ceil_div(k, t.tk) * ceil_div(np_, t.tn) * ceil_div(mp, tm)
    # Per-instruction overhead stands in for the DMA issue and dependency stalls of small tiles.
    compute = k_passes * n_passes * m_rows + instrs * cfg.mac_fill_drain
    traffic = (m * k * (1 if t.stage_a else t.gn) + k * n * (1 if t.stage_b else t.gm) + m * n) * esz
    memory = traffic / cfg.dram_bytes_per_cycle
    engines = t.gm * t.gn
    fill = engines * (t.tk * t.tn + tm * t.tk) * esz / cfg.dram_bytes_per_cycle
    last_tn = np_ - (ceil_div(np_, t.tn) - 1) * t.tn  # the final column tile drains alone
    drain = engines * mp * last_tn * esz / cfg.dram_bytes_per_cycle + compute / instrs
    # One cycle per instruction over all engines breaks ties towards fewer, larger tiles
    # (and keeps tracing cheap).
    return max(compute, memory) + fill + drain + cfg.dma_dram_latency + instrs * engines


TRIALS = 10  # candidates scheduled per shape


@functools.lru_cache(maxsize=512)
def choose_tiling(
    cfg, m: int, k: int, n: int, dtype: str = "bf16", out_dtype: str = "bf16", depth: int = 2
) -> Tiling:
    """Pick the engine grid and tiles: rank candidates by a cost estimate, then schedule the
    best few (no values, trace only) and keep the fastest."""
    esz, out_esz = DTYPE_BYTES[dtype], DTYPE_BYTES[out_dtype]
    col_blocks = ceil_div(n, cfg.mac_cols)
    tks = sorted(
        {_balanced(k, s, cfg.mac_rows) for s in _pow2_sizes(cfg.mac_rows, min(k, cfg.matmul_max_k))}
        | {min(k, cfg.matmul_max_k)}
    )
    cands = []
    grids = {(gm, min(cfg.num_engines // gm, col_blocks)) for gm in range(1, min(cfg.num_engines, m) + 1)}
    for gm, gn in sorted(grids):
        np_ = min(n, ceil_div(col_blocks, gn) * cfg.mac_cols)
        # Every width in whole MAC columns: an uneven last tile can shorten the drain.
        tns = set(range(cfg.mac_cols, min(np_, cfg.matmul_max_n) + 1, cfg.mac_cols))
        tns.add(min(np_, cfg.matmul_max_n))
        # Stage what several engines read, while it fits in shared SRAM (a first: smaller).
        stage_a = gn > 1 and m * k * esz <= cfg.shared_sram_bytes
        stage_b = gm > 1 and (m * k * esz * stage_a + k * n * esz) <= cfg.shared_sram_bytes
        for tk in tks:
            for tn in sorted(tns):
                t = Tiling(gm, gn, tk, tn, depth, stage_a, stage_b)
                if _fits(cfg, m, k, n, t, esz, out_esz):
                    cands.append((_estimate(cfg, m, k, n, t, esz), t))
    if not cands:
        raise KernelError(
            f"matmul: no tiling of (M, K, N) = ({m}, {k}, {n}) fits {cfg.local_sram_bytes} B of "
            f"local SRAM on {cfg.name!r}"
        )
    cands.sort(key=lambda c: c[0])
    best = None
    for _, t in cands[: TRIALS if _instructions(cfg, m, k, n, cands[0][1]) < 20_000 else 3]:
        cycles = _trial(cfg, m, k, n, dtype, out_dtype, t)
        if best is None or cycles < best[0]:
            best = (cycles, t)
    return best[1]


def _instructions(cfg, m, k, n, t: Tiling) -> int:
    mp, np_ = t.blocks(cfg, m, n)
    per_engine = ceil_div(k, t.tk) * ceil_div(np_, t.tn) * (1 + 2 * ceil_div(mp, min(mp, cfg.matmul_max_m)))
    return per_engine * t.gm * t.gn


def _pow2_sizes(unit: int, limit: int):
    s = unit
    while s < limit:
        yield s
        s *= 2
    yield limit


def _trial(cfg, m, k, n, dtype, out_dtype, t: Tiling) -> float:
    from emulator.memory import DRAM, Buffer
    from emulator.timing import schedule

    ctx = KernelContext("matmul-trial", cfg, execute=False, dtype=dtype)
    a = Buffer("a", DRAM, (m, k), dtype, 0, 0)
    b = Buffer("b", DRAM, (k, n), dtype, 0, 0)
    _emit_tiled(ctx, a, b, out_dtype, t)
    return schedule(ctx.stream(), cfg).total


def matmul_emit(k, a, b, *, out_dtype=None, depth: int = 2, tiling: Tiling | None = None):
    (m, kk), (kk2, n) = a.shape, b.shape
    if kk != kk2:
        raise KernelError(f"matmul: a {a.shape} and b {b.shape} do not chain")
    if a.dtype != b.dtype:
        raise KernelError(f"matmul: a is {a.dtype} and b is {b.dtype}")
    if depth < 1:
        raise KernelError(f"matmul: depth must be >= 1, got {depth}")
    out_dtype = out_dtype or k.dtype
    t = tiling or choose_tiling(k.config, m, kk, n, a.dtype, out_dtype, depth)
    return _emit_tiled(k, a, b, out_dtype, t)


class _Stager:
    """Copies a DRAM operand into shared SRAM one k-tile at a time, on first request.

    ``axis`` is the operand's contraction axis (1 for a, 0 for b). Each k-tile is split along
    the other axis over every queue, so its pieces move in parallel and it lands early."""

    def __init__(self, k, src, axis: int, tk: int, name: str):
        self.k, self.src, self.axis, self.tk = k, src, axis, tk
        self.dst = k.alloc(src.shape, src.dtype, shared=True, name=name)
        self.done = set()

    def ensure(self, k0: int) -> None:
        if k0 in self.done:
            return
        self.done.add(k0)
        k, cfg = self.k, self.k.config
        kl = min(self.tk, self.src.shape[self.axis] - k0)
        other = self.src.shape[1 - self.axis]
        piece = ceil_div(other, cfg.dma_queues)
        for q, (o0, ol) in enumerate(tiles(other, piece)):
            if self.axis == 1:
                region = (slice(o0, o0 + ol), slice(k0, k0 + kl))
            else:
                region = (slice(k0, k0 + kl), slice(o0, o0 + ol))
            k.dma(self.dst[region], self.src[region], queue=q % cfg.dma_queues)


def _emit_tiled(k, a, b, out_dtype: str, t: Tiling):
    cfg = k.config
    m, n = a.shape[0], b.shape[1]
    out = k.output((m, n), out_dtype, name="out")
    mp, np_ = t.blocks(cfg, m, n)
    stage_a = _Stager(k, a, 1, t.tk, "a_shared") if t.stage_a else None
    stage_b = _Stager(k, b, 0, t.tk, "b_shared") if t.stage_b else None
    per_engine = max(1, cfg.dma_queues // cfg.num_engines)
    programs = []
    engine = 0
    for gi in range(t.gm):
        for gj in range(t.gn):
            m0, m1 = gi * mp, min(m, (gi + 1) * mp)
            n0, n1 = gj * np_, min(n, (gj + 1) * np_)
            if m0 < m1 and n0 < n1:
                queues = (
                    (engine * per_engine) % cfg.dma_queues,
                    (engine * per_engine + per_engine - 1) % cfg.dma_queues,
                )
                programs.append(
                    _engine_program(k, engine, a, b, out, stage_a, stage_b, (m0, m1), (n0, n1), t, queues)
                )
            engine += 1
    # Interleave the engines' programs step by step (program order is issue order per queue).
    while programs:
        programs = [p for p in programs if next(p, StopIteration) is not StopIteration]
    return out


def _engine_program(k, e, a, b, out, stage_a, stage_b, mr, nr, t: Tiling, queues):
    cfg = k.config
    (m0, m1), (n0, n1) = mr, nr
    q_a, q_b = queues
    rows, kk = m1 - m0, a.shape[1]
    tm = min(rows, cfg.matmul_max_m)
    m_tiles = list(tiles(rows, tm))
    src_a = stage_a.dst if stage_a else a
    src_b = stage_b.dst if stage_b else b
    esz = DTYPE_BYTES[a.dtype]
    fixed = t.depth * t.tk * t.tn * esz + 2 * rows * t.tn * 4 + 2 * tm * t.tn * DTYPE_BYTES[out.dtype]
    resident_a = fixed + rows * kk * esz <= cfg.local_sram_bytes
    if resident_a:
        a_loc = k.alloc((rows, kk), a.dtype, engine=e, name=f"a_e{e}")
        a_loaded = set()
    else:
        a_slots = [k.alloc((tm, t.tk), a.dtype, engine=e, name=f"a{s}_e{e}") for s in range(t.depth)]
    b_slots = [k.alloc((t.tk, t.tn), b.dtype, engine=e, name=f"b{s}_e{e}") for s in range(t.depth)]
    accs = [k.alloc((rows, t.tn), "fp32", engine=e, name=f"acc{s}_e{e}") for s in range(2)]
    outs = [k.alloc((tm, t.tn), out.dtype, engine=e, name=f"o{s}_e{e}") for s in range(2)]
    step = 0
    for ni, (c0, cl) in enumerate(tiles(n1 - n0, t.tn)):
        acc = accs[ni % 2]
        cols = slice(n0 + c0, n0 + c0 + cl)
        for ki, (k0, kl) in enumerate(tiles(kk, t.tk)):
            for stager in (stage_a, stage_b):
                if stager:
                    stager.ensure(k0)
            bt = b_slots[step % t.depth][:kl, :cl]
            k.dma(bt, src_b[k0 : k0 + kl, cols], queue=q_b)
            for r0, rl in m_tiles:
                rows_a = slice(m0 + r0, m0 + r0 + rl)
                if resident_a:
                    at = a_loc[r0 : r0 + rl, k0 : k0 + kl]
                    if (r0, k0) not in a_loaded:
                        k.dma(at, src_a[rows_a, k0 : k0 + kl], queue=q_a)
                        a_loaded.add((r0, k0))
                else:
                    at = a_slots[step % t.depth][:rl, :kl]
                    k.dma(at, src_a[rows_a, k0 : k0 + kl], queue=q_a)
                k.matmul(acc[r0 : r0 + rl, :cl], at, bt, accumulate=ki > 0)
            step += 1
            yield
        for mi, (r0, rl) in enumerate(m_tiles):
            o = outs[mi % 2]
            # The vector unit takes at most vector_max_elements per instruction.
            for s0, sl in tiles(rl, max(1, cfg.vector_max_elements // cl)):
                k.vector("copy", o[s0 : s0 + sl, :cl], acc[r0 + s0 : r0 + s0 + sl, :cl])
            k.dma(out[m0 + r0 : m0 + r0 + rl, cols], o[:rl, :cl], queue=q_a)


matmul = Kernel("matmul", matmul_emit, matmul_fast, matmul_reference)

__all__ = ["matmul", "matmul_emit", "matmul_fast", "matmul_reference", "choose_tiling", "Tiling", "flops"]
