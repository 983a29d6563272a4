"""Token embedding lookup with Gemma's scale: ``out = table[ids] * scale``.

Gemma multiplies the looked-up rows by ``sqrt(hidden_size)`` cast to the weight dtype; the
caller passes that value as ``scale`` (e.g. ``float(round_bf16(np.sqrt(D)))``).

IO (DRAM): ids (T,) int32 in [0, V); table (V, D) in the device dtype (or fp32); out (T, D)
in the table's dtype (the product is formed in fp32 and rounded once on the way out).
Compile-time constants: ``scale`` (float), optional ``plan`` (``EmbeddingPlan``).

Plan (``choose_plan``, per shape): tokens are split over ``gt`` engine groups and the columns
over ``gd`` engines per group (``gd > 1`` when there are fewer tokens than engines, e.g. one
decode token: every engine gathers a slice of the row). Each engine loads its ids once (on a
queue the gathers do not use), then streams tiles of ``tt`` tokens: ``k.gather`` of the rows
(indirect DMA on the ids in local SRAM) on its load queue(s), one vector multiply by the
scale per ``vector_max_elements`` into an output tile, the store on its store queue(s);
``depth`` buffers each, so gathers and stores overlap the vector unit.

SRAM per engine: ``depth`` x (gathered rows + output tile) of ``tt x D / gd``, plus the ids.
FLOPs: none on the matrix unit; one vector multiply per element.
Bandwidth bound: DRAM bytes = 2 x T x D x element size (rows gathered, rows written) + 4 T.
The report's compulsory bytes count the whole table (V x D) instead, so its roofline is not
the bound of this kernel: compare cycles with the rows actually gathered.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from npu_emulator import Kernel, KernelError
from npu_emulator.memory import itemsize
from npu_emulator.program import KernelContext, ceil_div, tiles

from .common import fastest, index_queue, interleave, load_store_queues, split


def embedding_reference(ids, table, *, scale: float = 1.0, **_) -> np.ndarray:
    return table.astype(np.float64)[ids] * scale


def _check(ids_shape, table_shape):
    if len(ids_shape) != 1 or len(table_shape) != 2:
        raise KernelError(
            f"embedding: ids must be (T,) and the table (V, D), got {ids_shape} and {table_shape}"
        )


def embedding_fast(ids, table, *, scale: float = 1.0, **_) -> np.ndarray:
    _check(ids.shape, table.shape)
    idx = np.ascontiguousarray(ids, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= table.shape[0]):
        raise KernelError(f"embedding: ids must lie in [0, {table.shape[0]}), got {idx.min()}..{idx.max()}")
    rows = np.asarray(table[idx], dtype=np.float32)  # only the rows read are widened (bf16 tables)
    return rows * np.float32(scale)


@dataclass(frozen=True)
class EmbeddingPlan:
    gd: int  # engines sharing one token block, each gathering a block of columns
    tt: int  # tokens per tile
    depth: int = 3  # gather / output buffers per engine


def _fits(cfg, tpe: int, width: int, esz: int, p: EmbeddingPlan) -> bool:
    """Local SRAM of one engine: its ids and ``depth`` x (gathered rows, output tile)."""
    cw = ceil_div(width, p.gd)
    padding = (2 * p.depth + 1) * cfg.sram_alignment
    return 4 * tpe + 2 * p.depth * p.tt * cw * esz + padding <= cfg.local_sram_bytes


def _estimate(cfg, tokens, width, esz, p: EmbeddingPlan) -> float:
    gt = min(tokens, cfg.num_engines // p.gd)
    engines = gt * p.gd
    tpe = ceil_div(tokens, gt)
    cw = ceil_div(width, p.gd)
    n_tiles = ceil_div(tpe, p.tt)
    dram = 2 * tokens * width * esz / cfg.dram_bytes_per_cycle
    per_tile = (
        ceil_div(p.tt * cw, cfg.vector_max_elements) * cfg.vector_latency + p.tt * cw / cfg.vector_lanes
    )
    tile_bytes = engines * p.tt * cw * esz / cfg.dram_bytes_per_cycle
    queue = p.tt * cw * esz / cfg.dma_queue_bytes_per_cycle
    latency = 3 * cfg.dma_dram_latency + per_tile + 2 * max(tile_bytes, queue)
    return max(dram, n_tiles * per_tile) + latency + engines * n_tiles * 4


TRIALS = 6


@functools.lru_cache(maxsize=256)
def choose_plan(cfg, tokens: int, width: int, dtype: str = "bf16") -> EmbeddingPlan:
    esz = itemsize(dtype)
    cands = []
    gds = {1} | (
        {d for d in range(1, cfg.num_engines + 1) if d <= width} if tokens < cfg.num_engines else set()
    )
    for gd in sorted(gds):
        gt = min(tokens, cfg.num_engines // gd)
        tpe = ceil_div(tokens, gt)
        for d in (1, 2, 3, 4, 6, 8, 16):
            p = EmbeddingPlan(gd, max(1, ceil_div(tpe, d)))
            if p not in cands and _fits(cfg, tpe, width, esz, p):
                cands.append(p)
    if not cands:
        raise KernelError(f"embedding: no tile of width {width} fits {cfg.local_sram_bytes} B of local SRAM")
    cands.sort(key=lambda p: _estimate(cfg, tokens, width, esz, p))
    return fastest(cands[:TRIALS], lambda p: _trial(cfg, tokens, width, dtype, p))


def _trial(cfg, tokens, width, dtype, p) -> float:
    from npu_emulator.memory import DRAM, Buffer
    from npu_emulator.timing import schedule

    ctx = KernelContext("embedding-trial", cfg, execute=False, dtype=dtype)
    ids = Buffer("ids", DRAM, (tokens,), "int32", 0, 0)
    table = Buffer("table", DRAM, (max(1, tokens), width), dtype, 0, 0)
    embedding_emit(ctx, ids, table, scale=1.0, plan=p)
    return schedule(ctx.stream(), cfg).total


def embedding_emit(k, ids, table, *, scale: float = 1.0, plan: EmbeddingPlan | None = None):
    _check(ids.shape, table.shape)
    if ids.dtype != "int32":
        raise KernelError(f"embedding: ids must be int32, got {ids.dtype}")
    cfg = k.config
    tokens, width = ids.shape[0], table.shape[1]
    p = plan or choose_plan(cfg, tokens, width, table.dtype)
    out = k.output((tokens, width), table.dtype, name="out")
    # Compulsory traffic: the ids, the rows gathered and the rows written (not the whole table).
    k.set_roofline_bytes(tokens * 4 + 2 * tokens * width * itemsize(table.dtype))
    gt = min(tokens, cfg.num_engines // p.gd)
    programs = []
    for gi, tb in enumerate(split(tokens, gt)):
        for gj, cb in enumerate(split(width, p.gd)):
            programs.append(_engine_program(k, gi * p.gd + gj, ids, table, out, tb, cb, float(scale), p))
    interleave(programs)
    return out


def _engine_program(k, e, ids, table, out, tb, cb, scale, p: EmbeddingPlan):
    cfg = k.config
    (t0, tn), (c0, cw) = tb, cb
    lq, sq = load_store_queues(cfg, e)
    idx = k.alloc((tn,), "int32", engine=e, name=f"ids_e{e}")
    # Not on a gather queue: a queue overlaps its descriptors' latencies, so a gather behind
    # the load of its indices on the same queue would not wait for them.
    k.dma(idx, ids[t0 : t0 + tn], queue=index_queue(cfg, lq, sq))
    cols = table[:, c0 : c0 + cw]  # (V, cw): the gathers' table
    rows = [k.alloc((p.tt, cw), table.dtype, engine=e, name=f"rows{s}_e{e}") for s in range(p.depth)]
    outs = [k.alloc((p.tt, cw), out.dtype, engine=e, name=f"o{s}_e{e}") for s in range(p.depth)]
    per_instr = max(1, cfg.vector_max_elements // cw)  # rows per vector instruction
    col_chunk = min(cw, cfg.vector_max_elements)
    for i, (a0, al) in enumerate(tiles(tn, p.tt)):
        s = i % p.depth
        rt, ot = rows[s][:al], outs[s][:al]
        for q, (s0, sl) in zip(lq, split(al, len(lq))):
            k.gather(rt[s0 : s0 + sl], cols, idx[a0 + s0 : a0 + s0 + sl], queue=q)
        for r0, rl in tiles(al, per_instr):
            for x0, xl in tiles(cw, col_chunk):
                k.vector("mul", ot[r0 : r0 + rl, x0 : x0 + xl], rt[r0 : r0 + rl, x0 : x0 + xl], scale)
        for q, (s0, sl) in zip(sq, split(al, len(sq))):
            k.dma(out[t0 + a0 + s0 : t0 + a0 + s0 + sl, c0 : c0 + cw], ot[s0 : s0 + sl], queue=q)
        yield


embedding = Kernel("embedding", embedding_emit, embedding_fast, embedding_reference)

__all__ = [
    "embedding",
    "embedding_emit",
    "embedding_fast",
    "embedding_reference",
    "EmbeddingPlan",
    "choose_plan",
]
