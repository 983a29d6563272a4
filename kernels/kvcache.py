"""KV-cache write: new keys (or values) scattered into a cache in DRAM, in place.

IO (DRAM): cache (B, Hkv, S, hd), updated in place (the kernel has no outputs); new
(B, T, Hkv, hd) in the cache's dtype, T new tokens per sequence (T > 1: a prefill chunk, T = 1:
decode); rows (B, T, Hkv) int32, the row of the cache viewed as (B * Hkv * S, hd) that each new
row goes to: ``(b * Hkv + h) * S + slot``, slot = position for a global cache and position % S
for a sliding-window ring buffer (``cache_rows`` builds it on the host). A repeated row keeps
the last new row written to it (a chunk longer than the ring). No compile-time constants.

Plan: the N = B * T * Hkv new rows are split into a few tiles; each tile's indices and rows
are loaded into one engine's local SRAM, split over several DMA queues (so DRAM bandwidth, not
one queue, bounds the loads), then written by one indirect DMA (``k.scatter``) on the last
queue. A scatter writes a whole-table region as far as dependency tracking knows (its rows are
data), so successive scatters into one cache run one after another, each at one queue's rate;
the tiles therefore grow geometrically so that each loads while the previous one is written
(``write_tiles``), and the write-out, not the loads, sets the time.

SRAM: per tile (rows x hd) in the cache dtype plus (rows,) int32, tiles placed round-robin on
the engines, two live per engine at most (one loading, one being written), each within half
of the local SRAM. FLOPs: none. DRAM bytes: N * hd * elt read and N * hd * elt written, plus
N * 4 bytes of indices; the rest of the cache is not touched.
"""

from __future__ import annotations

import numba
import numpy as np

from emulator import Kernel, KernelError
from emulator.memory import itemsize
from emulator.program import ceil_div

from .common import rows_view, split


def cache_rows(slots, n_kv_heads: int, cache_len: int) -> np.ndarray:
    """rows (B, T, Hkv) int32 for slots (B, T): ``(b * Hkv + h) * S + slot``.

    slots = positions for a global cache, positions % S for a ring buffer."""
    slots = np.asarray(slots, dtype=np.int64)
    if slots.ndim != 2:
        raise ValueError(f"cache_rows: slots must be (B, T), got shape {slots.shape}")
    if slots.size and (slots.min() < 0 or slots.max() >= cache_len):
        raise ValueError(f"cache_rows: slots must lie in [0, {cache_len}), got {slots.min()}..{slots.max()}")
    b = np.arange(slots.shape[0])[:, None, None]
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
    # Sequential on purpose: a repeated row must keep the last write, as the DMA does.
    n_b, n_h, s_len, _ = cache.shape
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
            f"kv_cache_write: want cache (B, Hkv, S, hd), new (B, T, Hkv, hd), rows (B, T, Hkv); got "
            f"{cache.shape}, {new.shape}, {rows.shape}"
        )
    b, hkv, _, hd = cache.shape
    if new.shape[0] != b or new.shape[2:] != (hkv, hd) or tuple(rows.shape) != tuple(new.shape[:3]):
        raise KernelError(
            f"kv_cache_write: shapes do not agree: cache {cache.shape}, new {new.shape}, rows {rows.shape}"
        )


def write_tiles(cfg, n: int, hd: int, esz: int) -> list[tuple[int, int, int]]:
    """(start, rows, load queues) per tile.

    Scatters run one after another, each on one queue (``dma_queue_bytes_per_cycle``), so the
    tiles grow geometrically: the first loads alone on every queue, each later one loads on
    just enough queues to fill the DRAM bandwidth the running scatter leaves, and is ready
    when that scatter ends. The tile count minimises the first load plus one descriptor latency
    per scatter. Every tile fits half an engine's local SRAM and one descriptor."""
    row_bytes = hd * esz + 4  # the row and its int32 index
    room = cfg.local_sram_bytes // 2 - 2 * cfg.sram_alignment  # two tiles live: one loads, one scatters
    cap = max(1, min(room // row_bytes, cfg.dma_max_elements // hd))
    all_loads = max(1, cfg.dma_queues - 1)
    ratio = int(max(1, min(all_loads, cfg.dram_bytes_per_cycle // cfg.dma_queue_bytes_per_cycle - 1)))
    best = None
    for count in range(1, 9):
        first = n / sum(ratio**i for i in range(count))
        if first < 1:
            break
        cost = first * row_bytes / cfg.dram_bytes_per_cycle + count * cfg.dma_dram_latency
        if best is None or cost < best[0]:
            best = (cost, count, first)
    _, count, first = best or (0, 1, n)
    sizes = [max(1, round(first * ratio**i)) for i in range(count - 1)]
    sizes.append(n - sum(sizes))
    out, start = [], 0
    for i, size in enumerate(sizes):
        for s0, sl in split(size, ceil_div(size, cap)):
            out.append((start + s0, sl, all_loads if i == 0 else ratio))
        start += size
    return out


def kv_cache_write_emit(k, cache, new, rows):
    cfg = k.config
    _check_rows(cache, new, rows)
    if rows.dtype != "int32" or new.dtype != cache.dtype:
        raise KernelError(
            f"kv_cache_write: rows must be int32 (got {rows.dtype}) and new {new.dtype} must match the "
            f"cache's {cache.dtype}"
        )
    hd = cache.shape[3]
    n = rows.size
    table = rows_view(cache)  # (B * Hkv * S, hd)
    src = rows_view(new)  # (N, hd), in (b, t, h) order like rows
    idx = rows.region(0, (n,), (1,))
    store_q = cfg.dma_queues - 1
    staged = []
    for i, (r0, rl, n_loads) in enumerate(write_tiles(cfg, n, hd, itemsize(cache.dtype))):
        e = i % cfg.num_engines
        it = k.alloc((rl,), "int32", engine=e, name=f"idx{i}")
        rt = k.alloc((rl, hd), cache.dtype, engine=e, name=f"rows{i}")
        for j, (p0, pl) in enumerate(split(rl, n_loads)):
            q = j % max(1, cfg.dma_queues - 1)
            k.dma(it[p0 : p0 + pl], idx[r0 + p0 : r0 + p0 + pl], queue=q)
            k.dma(rt[p0 : p0 + pl], src[r0 + p0 : r0 + p0 + pl], queue=q)
        staged.append((it, rt))
        if i:  # the previous tile's scatter, issued after this tile's loads
            _scatter(k, table, staged[i - 1], store_q)
    _scatter(k, table, staged[-1], store_q)
    return ()


def _scatter(k, table, staged, queue):
    k.scatter(table, *staged, queue=queue)
    for buf in staged:
        k.free(buf)  # reused once the scatter has read it


kv_cache_write = Kernel("kv_cache_write", kv_cache_write_emit, kv_cache_write_fast, kv_cache_write_reference)

__all__ = [
    "cache_rows",
    "kv_cache_write",
    "kv_cache_write_emit",
    "kv_cache_write_fast",
    "kv_cache_write_reference",
    "write_tiles",
]
