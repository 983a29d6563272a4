"""KV-cache write: new keys (or values) scattered into a cache in DRAM, in place.

IO (DRAM): cache (B, Hkv, S, hd), updated in place (the kernel has no outputs); new
(B', T, Hkv, hd) in the cache's dtype, T new tokens for each of B' <= B sequences (T > 1: a
prefill chunk, T = 1: decode); rows (B', T, Hkv) int32, the row of the cache viewed as
(B * Hkv * S, hd) that each new row goes to: ``(b * Hkv + h) * S + slot`` for the sequence b
that new row b' belongs to, slot = position for a global cache and position % S for a
sliding-window ring buffer (S: the window rounded up to whole decode KV tiles, so any window
works; ``cache_rows`` builds it on the host). No compile-time constants.

Contract on rows (what ``cache_rows`` of consecutive positions gives): rows[b', :, h] lie in
one (sequence, head) block of S cache rows, distinct (b', h) in distinct blocks, and a
sequence's slots are distinct within every run of S consecutive tokens (consecutive
positions, mod S for a ring). The kernel relies on it, not on the values: it cannot see them
when it plans. Then the B' * T * Hkv rows are distinct when T <= S. When T > S (a chunk longer
than the ring) slots repeat and a repeated row keeps the last new row written to it: a
sequence's tokens are cut into *laps* of S (rows distinct within a lap), and every write of a
lap waits for all writes of the sequence's previous lap.

Plan (``write_plan``): the N = B' * T * Hkv rows are cut into tiles (none crossing a lap) and
dealt round-robin, in row order, to *lanes*: lane j runs on DMA queue j and keeps a ring of
``depth`` tile slots in the local SRAM of engine j % engines. A lane loads a tile's int32
indices and rows, then writes the rows with one indirect DMA, ``k.scatter(..., unordered=True)``:
the rows of concurrent scatters are disjoint, so the lanes' scatters run at once and DRAM
bandwidth, not one queue's, bounds the write. On its queue a lane issues the loads of its
tile m + 1 before the scatter of tile m, so a scatter's latency hides behind the bytes of the
descriptors before it; two tiles per lane are enough for that (more only when a lane's rows do
not fit its ring). Lanes: enough to fill DRAM bandwidth (dram / queue bytes per cycle), more
(up to one per queue) when there are rows for two tiles each. What is left is one DRAM latency
before the first byte moves (T = 256 on atom: ~200 cycles over the bound) and, for decode (a
few rows), the two latencies of an index load followed by a scatter. Scatters are issued in
row order, so a repeated row's writes also happen in program order.

SRAM per lane: ``depth`` slots of (tile, hd) in the cache dtype plus (tile,) int32, the lanes
of one engine within half of its local SRAM. FLOPs: none. DRAM bytes (the roofline's, set by
``set_roofline_bytes``): N * hd * elt read and N * hd * elt written, plus N * 4 bytes of
indices; the rest of the cache is not touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

from npu_emulator import Kernel, KernelError
from npu_emulator.memory import itemsize
from npu_emulator.program import ceil_div

from .common import rows_view, split

DEPTH = 3  # tile slots per lane: one being written out, two loading ahead


def cache_rows(slots, n_kv_heads: int, cache_len: int, *, batch_offset: int = 0) -> np.ndarray:
    """rows (B', T, Hkv) int32 for slots (B', T) of sequences batch_offset, batch_offset + 1, ...:
    ``(b * Hkv + h) * S + slot``.

    slots = positions for a global cache, positions % S for a ring buffer."""
    slots = np.asarray(slots, dtype=np.int64)
    if slots.ndim != 2:
        raise ValueError(f"cache_rows: slots must be (B, T), got shape {slots.shape}")
    if slots.size and (slots.min() < 0 or slots.max() >= cache_len):
        raise ValueError(f"cache_rows: slots must lie in [0, {cache_len}), got {slots.min()}..{slots.max()}")
    if batch_offset < 0:
        raise ValueError(f"cache_rows: batch_offset {batch_offset} is negative")
    b = batch_offset + np.arange(slots.shape[0])[:, None, None]
    h = np.arange(n_kv_heads)[None, None, :]
    return ((b * n_kv_heads + h) * cache_len + slots[:, :, None]).astype(np.int32)


def kv_cache_write_reference(cache, new, rows):
    """The updated cache as a new array (the input is left alone); rows written in order."""
    out = np.array(cache, copy=True)
    flat = out.reshape(-1, cache.shape[-1])
    for r, row in zip(np.asarray(rows).reshape(-1), np.asarray(new).reshape(-1, cache.shape[-1])):
        flat[r] = row
    return out


@numba.njit(cache=True)
def _scatter_rows(cache, new, rows):
    # Sequential on purpose: a repeated row must keep the last write, as the tiled program does.
    n_h, s_len = cache.shape[1], cache.shape[2]
    for b in range(rows.shape[0]):
        for t in range(rows.shape[1]):
            for h in range(rows.shape[2]):
                bh, slot = divmod(rows[b, t, h], s_len)
                cache[bh // n_h, bh % n_h, slot, :] = new[b, t, h, :]


def kv_cache_write_fast(cache, new, rows):
    """Update ``cache`` in place (returns None, as the kernel makes no outputs)."""
    _check_rows(cache, new, rows)
    flat_rows = np.asarray(rows)
    if flat_rows.size and (
        flat_rows.min() < 0 or flat_rows.max() >= cache.shape[0] * cache.shape[1] * cache.shape[2]
    ):
        raise KernelError(f"kv_cache_write: a row index is outside the cache's {cache.shape[:3]} rows")
    _scatter_rows(cache, np.asarray(new, dtype=cache.dtype), flat_rows.astype(np.int64))


def _check_rows(cache, new, rows):
    if len(cache.shape) != 4 or len(new.shape) != 4 or len(rows.shape) != 3:
        raise KernelError(
            f"kv_cache_write: want cache (B, Hkv, S, hd), new (B', T, Hkv, hd), rows (B', T, Hkv); got "
            f"{cache.shape}, {new.shape}, {rows.shape}"
        )
    b, hkv, _, hd = cache.shape
    if not new.shape[0] <= b or new.shape[2:] != (hkv, hd) or tuple(rows.shape) != tuple(new.shape[:3]):
        raise KernelError(
            f"kv_cache_write: shapes do not agree: cache {cache.shape}, new {new.shape}, rows {rows.shape}"
        )


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Tile:
    """Rows [start, start + rows) of the flattened (B', T, Hkv) order, all in lap ``lap`` of
    sequence ``seq``; written by lane ``lane``."""

    start: int
    rows: int
    seq: int
    lap: int
    lane: int


@dataclass(frozen=True)
class WritePlan:
    tiles: tuple  # Tile, in row order: tile i goes to lane i % lanes
    lanes: int  # one per DMA queue q = lane, on engine lane % engines
    slot_rows: int  # rows per ring slot (the largest tile)
    depth: int  # ring slots per lane


def write_plan(cfg, batch: int, tokens: int, n_kv: int, cache_len: int, hd: int, esz: int) -> WritePlan:
    """Cut the rows into tiles and deal them to lanes; see the module docstring."""
    n = batch * tokens * n_kv
    # Enough lanes to fill DRAM bandwidth, two tiles each; more (up to a queue each) for more rows.
    saturate = math.ceil(cfg.dram_bytes_per_cycle / cfg.dma_queue_bytes_per_cycle)
    lanes = max(1, min(cfg.dma_queues, n, max(saturate, ceil_div(n, 2))))
    per_engine = ceil_div(lanes, cfg.num_engines)
    row_bytes = hd * esz + 4  # the row and its int32 index
    room = cfg.local_sram_bytes // 2 // per_engine - 2 * cfg.sram_alignment  # two buffers per lane
    cap = min(room // (DEPTH * row_bytes), cfg.dma_max_elements // hd)
    if cap < 1:
        raise KernelError(
            f"kv_cache_write: {DEPTH} rows of {row_bytes} B per lane do not fit half of "
            f"{cfg.local_sram_bytes} B of local SRAM"
        )
    count = min(n, lanes * max(2, ceil_div(ceil_div(n, cap), lanes)))  # the same per lane
    tiles = []
    for b in range(batch):
        for lap, (s0, sl) in enumerate(_laps(tokens, cache_len)):
            g0, gl = (b * tokens + s0) * n_kv, sl * n_kv  # a tile never crosses a lap
            for t0, tl in split(gl, max(round(count * gl / n), ceil_div(gl, cap))):
                tiles.append(Tile(g0 + t0, tl, b, lap, len(tiles) % lanes))
    return WritePlan(tiles=tuple(tiles), lanes=lanes, slot_rows=max(t.rows for t in tiles), depth=DEPTH)


def _laps(tokens: int, cache_len: int):
    """(first token, tokens) of each lap: one lap when the chunk fits the cache."""
    if tokens <= cache_len:
        return [(0, tokens)]
    return [(s0, min(cache_len, tokens - s0)) for s0 in range(0, tokens, cache_len)]


# ----------------------------------------------------------------------------- the program


def kv_cache_write_emit(k, cache, new, rows):
    cfg = k.config
    _check_rows(cache, new, rows)
    if rows.dtype != "int32" or new.dtype != cache.dtype:
        raise KernelError(
            f"kv_cache_write: rows must be int32 (got {rows.dtype}) and new {new.dtype} must match the "
            f"cache's {cache.dtype}"
        )
    _, hkv, s_len, hd = cache.shape
    batch, tokens = new.shape[:2]
    n = rows.size
    esz = itemsize(cache.dtype)
    k.set_roofline_bytes(n * (2 * hd * esz + 4))  # rows in, rows out, their indices
    if n == 0:
        return ()
    plan = write_plan(cfg, batch, tokens, hkv, s_len, hd, esz)
    table = rows_view(cache)  # (B * Hkv * S, hd)
    src = rows_view(new)  # (N, hd), in (b, t, h) order like rows
    idx = rows.region(0, (n,), (1,))
    rings = []
    for lane in range(plan.lanes):
        e = lane % cfg.num_engines
        rings.append(
            (
                k.alloc((plan.depth, plan.slot_rows), "int32", engine=e, name=f"idx_l{lane}"),
                k.alloc((plan.depth, plan.slot_rows, hd), cache.dtype, engine=e, name=f"rows_l{lane}"),
            )
        )
    count = [0] * plan.lanes  # tiles dealt to each lane so far
    staged = {}  # tile index -> (indices view, rows view), loaded and not yet written
    scattered: dict[tuple[int, int], list[int]] = {}  # (seq, lap) -> scatter ids
    tiles = plan.tiles
    # Loads of tile i + lanes (the lane's next tile) are issued before the scatter of tile i.
    for i in range(len(tiles) + plan.lanes):
        if i < len(tiles):
            t = tiles[i]
            slot = count[t.lane] % plan.depth
            count[t.lane] += 1
            it, rt = rings[t.lane][0][slot, : t.rows], rings[t.lane][1][slot, : t.rows]
            k.dma(it, idx[t.start : t.start + t.rows], queue=t.lane)
            k.dma(rt, src[t.start : t.start + t.rows], queue=t.lane)
            staged[i] = (it, rt)
        j = i - plan.lanes
        if j >= 0:
            t = tiles[j]
            wait = scattered.get((t.seq, t.lap - 1), ())  # the previous lap's writes
            sid = k.scatter(table, *staged.pop(j), queue=t.lane, unordered=True, after=wait)
            scattered.setdefault((t.seq, t.lap), []).append(sid)
    return ()


kv_cache_write = Kernel("kv_cache_write", kv_cache_write_emit, kv_cache_write_fast, kv_cache_write_reference)

__all__ = [
    "cache_rows",
    "kv_cache_write",
    "kv_cache_write_emit",
    "kv_cache_write_fast",
    "kv_cache_write_reference",
    "write_plan",
    "WritePlan",
    "Tile",
]
