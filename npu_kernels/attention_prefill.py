"""Prefill attention: a chunk of T queries against the KV cache and itself, flash-style.

    out[t, h] = softmax_k( q[t, h] . key[k] * scale  over visible keys k ) @ value[k]

IO (DRAM, device dtype, bf16 by default; all five inputs share one dtype):

* q            (T, Hq, hd)      queries of positions q_start .. q_start+T-1 (normed, rotated)
* k_new, v_new (T, Hkv, hd)     keys / values of those same positions (the chunk sees itself)
* k_cache, v_cache (B, Hkv, S, hd)  entry ``batch`` holds earlier positions:
  ``ring=False`` (global layer): position p in slot p, valid 0 <= p < q_start (q_start <= S);
  ``ring=True`` (sliding layer, S >= window): position p in slot p % S, valid
  max(0, q_start - S) <= p < q_start. A ring may hold more slots than the window (a model
  rounds it up to whole decode KV tiles): the extra slots hold the positions just before the
  window, which the mask hides and the kernel never reads. The kernel only reads; the model
  writes the chunk into the cache afterwards with another kernel.
* out          (T, Hq, hd)      device dtype.

Compile-time constants: q_start, scale (> 0), window (None: global; any positive int), ring,
batch, image_blocks (tuple of absolute [start, end) ranges whose tokens see each other both
ways). GQA / MQA: Hq = G * Hkv, query head h reads kv head h // G.

Visibility of key position kp from query position qp (transformers' Gemma3 masks: global
layers ``OR(causal, block)``, sliding layers ``AND(window, OR(causal, block))``)::

    (kp <= qp or (qp, kp in one image block)) and (window is None or kp > qp - window)

over the keys that exist: the valid cache entries and the chunk. The window bounds an image's
own keys too: an image longer than the window sees, from its query qp, only its keys past
qp - window (and all its later ones). An image block that begins inside the chunk must end
inside it (its queries would need keys not computed yet), and the keys a query needs must
still be in a ring cache (S >= window - 1); both raise KernelError.

Masks of a chunk at q_start = 4, T = 6, window 3, image block [5, 9) (longer than the window),
'x' visible, '.' masked, '|' the boundary between cache slots and the chunk's own keys (k_new)::

                key kp   0 1 2 3 | 4 5 6 7 8 9
        query 4          . . x x | x . . . . .     causal edge   kp <= qp
        query 5 (image)  . . . x | x x x x x .     window edge   kp >  qp - window
        query 6 (image)  . . . . | x x x x x .     image rows:   kp <= block end - 1
        query 7 (image)  . . . . | . x x x x .       (one more select; rows split at the
        query 8 (image)  . . . . | . . x x x .        block's boundaries)
        query 9          . . . . | . . . x x x

Each row sees one contiguous interval [lo(qp), hi(qp)]: lo the window edge (slope 1) or none,
hi the causal edge (slope 1) or, in an image, the block's last key (a constant). A query tile's
rows therefore see one contiguous key range; only that range is tiled and loaded, so key
tiles entirely masked for a query tile are never emitted (where sliding windows save work).

Plan (every size from ``k.config``; chosen per shape by ``choose_plan``, cached):

* Work items: (kv head, group of ``hg`` query heads sharing it, tile of ``tq`` queries). The
  ``hg`` heads are stacked along the matrix unit's M axis, M = hg * tq rows (row g * tq + i is
  head g, query i), so one K^T tile serves all of them. Items go to engines kv head by kv
  head, longest first to the least-loaded engine (balancing causal triangles), so engines
  work through the heads roughly in step.
* Per item, its key range in tiles of ``tk`` keys. Per key tile: K^T (hd, tk) arrives by a
  transposing DMA (K is stored (S, hd) row major), V (tk, hd) by a plain one; a tile may
  gather from cache slots (wrapping around a ring) and k_new in one buffer.
* A kv head read by several engines is staged once into shared SRAM (DRAM read once, then
  shared -> local per engine), chunk by chunk a tile ahead of first use, each chunk in
  pieces over enough queues to run at DRAM bandwidth.
* Online softmax per (item, key tile), in fp32, with m the running max of raw scores:

      S = Q @ K^T                        matrix unit, fp32 (contraction chunked by matmul_max_k)
      S = select(S) per mask edge        vector unit; image rows split by block boundaries
      m' = max(m, rowmax S)              (first tile: max(rowmax S, -BIG): a finite start so a
      alpha = exp(scale m - scale m')     row fully masked so far gives 0, never inf - inf)
      P = exp(scale S - scale m')        SFU, written into a bf16 buffer (the cast)
      l = l alpha + rowsum P
      acc = acc alpha + P @ V            vector rescale, then the matrix unit accumulates
      out = acc / l                      after the last tile, into bf16; the last tile's
                                         P @ V goes by column chunks, each written out at once

* Software pipelined: the matrix unit runs S of the next tile while the vector unit and SFU
  work on the softmax of this one; K^T / V load two tiles ahead through three buffers, Q one
  item ahead through two. K^T has a DMA queue of its own (it gates the next matmul); Q, V
  and the output share the engine's others. Engines' programs interleave tile by tile in
  program order, after every engine's first Q and first K^T chunks.
* ``choose_plan`` ranks (hg, tq, tk) by an estimate (busiest engine after the assignment,
  DRAM bytes) and schedules the best few, trace only, while their streams are short.

SRAM per engine (e = dtype bytes): Q 2 x M hd e, K^T 3 x hd tk e, V 3 x tk hd e, S 2 x M tk 4,
P 2 x M tk e, acc 2 x M hd 4, out 2 x M hd e, row stats 14 x M 4. Shared SRAM: for each staged
kv head, its K^T and V over the key range its items read.
FLOPs on the matrix unit: 4 hd M kl per key tile (QK^T and PV), summed over emitted tiles;
the visible work is 4 hd x (number of visible (query head, key) pairs) (``visible_flops``).
Compulsory DRAM bytes as the report counts them: all of q, k_new, v_new, out and both whole
caches; only the visible part of the caches is read (``needed_dram_bytes``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numba
import numpy as np

from npu_emulator import Kernel, KernelError
from npu_emulator.fixedmath import exp32
from npu_emulator.memory import itemsize
from npu_emulator.program import KernelContext, ceil_div, tiles

from . import hostmath
from .common import interleave

AFF = "aff"  # an edge that moves with the query: kp = qp (causal) or kp = qp - window + 1
CONST = "const"  # an edge at a fixed key position (an image block's last key)


# --------------------------------------------------------------------------- reference


def attention_prefill_reference(
    q, k_new, v_new, k_cache, v_cache, *, q_start, scale, window=None, ring=False, batch=0, image_blocks=()
):
    """Full score matrix, a boolean mask built pair by pair, a plain softmax, all in float64."""
    T, Hq, hd = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    first = max(0, q_start - S) if ring else 0
    cache_pos = list(range(first, q_start))
    slots = [p % S if ring else p for p in cache_pos]
    key_pos = cache_pos + [q_start + t for t in range(T)]
    keys = np.concatenate([k_cache[batch][:, slots, :], np.transpose(k_new, (1, 0, 2))], axis=1)
    vals = np.concatenate([v_cache[batch][:, slots, :], np.transpose(v_new, (1, 0, 2))], axis=1)
    keys, vals = keys.astype(np.float64), vals.astype(np.float64)
    mask = np.zeros((T, len(key_pos)), np.bool_)
    for t in range(T):
        qp = q_start + t
        for j, kp in enumerate(key_pos):
            visible = kp <= qp or any(s <= qp < e and s <= kp < e for s, e in image_blocks)
            mask[t, j] = visible and (window is None or kp > qp - window)
    out = np.zeros((T, Hq, hd))
    for h in range(Hq):
        scores = q[:, h, :].astype(np.float64) @ keys[h // G].T * scale
        scores = np.where(mask, scores, -np.inf)
        p = np.exp(scores - scores.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        out[:, h, :] = p @ vals[h // G]
    return out


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Geometry:
    """Shapes and mask constants of one call (hashable: the plan cache key)."""

    T: int
    Hq: int
    Hkv: int
    hd: int
    S: int
    q_start: int
    window: int | None
    ring: bool
    blocks: tuple  # image blocks that hold queries of this chunk, sorted
    dtype: str = "bf16"

    @property
    def G(self) -> int:
        return self.Hq // self.Hkv

    @property
    def q_end(self) -> int:
        return self.q_start + self.T

    @property
    def c_lo(self) -> int:
        """First position held by the cache."""
        return max(0, self.q_start - self.S) if self.ring else 0


def geometry(
    q_shape,
    kv_new_shape,
    cache_shape,
    *,
    q_start,
    window=None,
    ring=False,
    batch=0,
    image_blocks=(),
    dtype="bf16",
):
    """Validate shapes and constants; return the Geometry (raises KernelError)."""
    if len(q_shape) != 3 or len(kv_new_shape) != 3 or len(cache_shape) != 4:
        raise KernelError(
            f"attention_prefill: q {q_shape} and k_new {kv_new_shape} must be (T, H, hd), "
            f"the cache {cache_shape} (B, Hkv, S, hd)"
        )
    T, Hq, hd = q_shape
    B, Hkv, S, hd_c = cache_shape
    if kv_new_shape != (T, Hkv, hd) or hd_c != hd:
        raise KernelError(
            f"attention_prefill: q {q_shape}, k_new/v_new {kv_new_shape} and cache {cache_shape} "
            "disagree on T, Hkv or hd"
        )
    if T < 1 or Hkv < 1 or Hq % Hkv:
        raise KernelError(f"attention_prefill: Hq = {Hq} must be a positive multiple of Hkv = {Hkv}")
    if not 0 <= batch < B:
        raise KernelError(f"attention_prefill: batch {batch} outside the cache's {B} entries")
    if q_start < 0 or (not ring and q_start > S):
        raise KernelError(
            f"attention_prefill: q_start {q_start} must be in [0, S = {S}] for a global (ring=False) cache"
        )
    if window is not None and window < 1:
        raise KernelError(f"attention_prefill: window must be >= 1 or None, got {window}")
    q_end = q_start + T
    blocks = sorted((int(s), int(e)) for s, e in image_blocks)
    for (s0, e0), (s1, _) in zip(blocks, blocks[1:]):
        if s1 < e0:
            raise KernelError(f"attention_prefill: image blocks {(s0, e0)} and {(s1, _)} overlap")
    relevant = []
    for s, e in blocks:
        if s >= e:
            raise KernelError(f"attention_prefill: empty image block {(s, e)}")
        if e <= q_start or s >= q_end:
            continue  # no query of this chunk lies in it
        if e > q_end:
            raise KernelError(
                f"attention_prefill: image block {(s, e)} extends past the chunk's end {q_end}: its "
                "queries would need keys not computed yet; end the chunk at the block's end"
            )
        relevant.append((s, e))
    geo = Geometry(T, Hq, Hkv, hd, S, q_start, window, bool(ring), tuple(relevant), dtype)
    need = min(max(0, _row_interval(geo, p)[0]) for p in range(q_start, q_end))
    if need < geo.c_lo:
        raise KernelError(
            f"attention_prefill: a query needs key position {need}, but the ring cache of {S} slots "
            f"holds positions from {geo.c_lo} on (a ring needs a window and S >= window - 1)"
        )
    return geo


def _block_of(geo: Geometry, p: int):
    for s, e in geo.blocks:
        if s <= p < e:
            return s, e
    return None


def _row_rules(geo: Geometry, p: int):
    """(lo, hi) edge rules of query position p: lo (AFF,) or None (no window), hi (AFF,) or
    (CONST, c)."""
    lo = (AFF,) if geo.window else None  # the window bounds image rows too (module docstring)
    blk = _block_of(geo, p)
    if blk is None:
        return lo, (AFF,)
    # Visible: ([0, qp] union [s, e - 1]) from qp - W + 1 on: [qp - W + 1, e - 1] (qp in [s, e)).
    return lo, (CONST, blk[1] - 1)


def _row_interval(geo: Geometry, p: int) -> tuple[int, int]:
    """[lo, hi] key positions visible from query position p (before clipping to the cache)."""
    lo, hi = _row_rules(geo, p)
    lo_v = -(1 << 60) if lo is None else p - geo.window + 1
    hi_v = p if hi[0] == AFF else hi[1]
    return lo_v, hi_v


def row_segments(geo: Geometry, a: int, b: int):
    """Split query positions [a, b) where the edge rules change: [(p0, p1, lo, hi)]."""
    cuts = {a, b}
    for s, e in geo.blocks:
        for c in (s, e):
            if a < c < b:
                cuts.add(c)
    cuts = sorted(cuts)
    return [(p0, p1, *_row_rules(geo, p0)) for p0, p1 in zip(cuts, cuts[1:])]


def key_range(geo: Geometry, segs) -> tuple[int, int]:
    """[klo, khi) key positions any row of these segments sees (contiguous: every row's
    interval holds its own position)."""
    lo = min(_row_interval(geo, p0)[0] for p0, _, _, _ in segs)
    hi = max(_row_interval(geo, p1 - 1)[1] for _, p1, _, _ in segs)
    return max(geo.c_lo, lo), min(geo.q_end, hi + 1)


def selects(geo: Geometry, p0: int, p1: int, lo, hi, k0: int, k1: int):
    """The (offset, row_coef, col_coef) selects that query rows [p0, p1) need on key tile
    [k0, k1), with i = qp - p0 and j = kp - k0: keep where offset + row*i + col*j >= 0."""
    out = []
    W = geo.window
    if lo is not None and k0 - (p1 - 1) + W - 1 < 0:  # kp >= qp - W + 1
        out.append((k0 - p0 + W - 1, -1, 1))
    if hi[0] == AFF:  # kp <= qp
        if p0 - (k1 - 1) < 0:
            out.append((p0 - k0, 1, -1))
    elif hi[1] < k1 - 1:  # kp <= c
        out.append((hi[1] - k0, 0, -1))
    return out


def visible_pairs(geo: Geometry) -> int:
    """Number of visible (query, key) pairs of one query head."""
    n = 0
    for t in range(geo.T):
        lo, hi = _row_interval(geo, geo.q_start + t)
        n += max(0, min(hi, geo.q_end - 1) - max(lo, geo.c_lo) + 1)
    return n


def visible_flops(geo: Geometry) -> int:
    """Matrix FLOPs of the visible work: QK^T and PV, 2 each per multiply-add."""
    return 4 * geo.hd * geo.Hq * visible_pairs(geo)


def needed_dram_bytes(geo: Geometry) -> int:
    """Bytes that must cross DRAM: q, k_new, v_new, out, and the cache entries some query
    sees (the report's compulsory bytes count both whole caches instead)."""
    lo = min(max(geo.c_lo, _row_interval(geo, geo.q_start + t)[0]) for t in range(geo.T))
    cached = max(0, geo.q_start - lo)
    return (2 * geo.T * geo.Hq + 2 * (geo.T + cached) * geo.Hkv) * geo.hd * itemsize(geo.dtype)


# --------------------------------------------------------------------------- fast


@numba.njit(parallel=True, cache=True)  # rows on Numba's threads (npu_kernels/hostmath.py)
def _masked_softmax(s, G, q_start, key_pos, key_blk, q_blk, window, scale):
    """In place: s (T * G, n) raw scores, row t * G + g -> softmax over the visible keys."""
    rows, n = s.shape
    for r in numba.prange(rows):
        t = r // G
        qp = q_start + t
        m = -np.inf
        for j in range(n):
            kp = key_pos[j]
            vis = kp <= qp or (q_blk[t] >= 0 and key_blk[j] == q_blk[t])
            if vis and (window <= 0 or kp > qp - window):
                x = s[r, j] * scale
                s[r, j] = x
                if x > m:
                    m = x
            else:
                s[r, j] = -np.inf
        for j in range(n):  # (vectorised: no call, no sum in this loop)
            s[r, j] = exp32(s[r, j] - m)
        total = np.float32(0.0)
        for j in range(n):
            total += s[r, j]
        inv = np.float32(1.0) / total
        for j in range(n):
            s[r, j] *= inv


def attention_prefill_fast(
    q, k_new, v_new, k_cache, v_cache, *, q_start, scale, window=None, ring=False, batch=0, image_blocks=()
):
    """The whole op in fp32: the two products per kv head in hostmath's fixed order, Numba for
    mask and softmax."""
    geo = geometry(
        q.shape,
        k_new.shape,
        k_cache.shape,
        q_start=q_start,
        window=window,
        ring=ring,
        batch=batch,
        image_blocks=image_blocks,
    )
    T, Hq, hd, Hkv, G, S = geo.T, geo.Hq, geo.hd, geo.Hkv, geo.G, geo.S
    cache_pos = np.arange(geo.c_lo, q_start)
    slots = cache_pos % S if ring else cache_pos
    key_pos = np.concatenate([cache_pos, np.arange(q_start, geo.q_end)]).astype(np.int64)
    blk = np.full(key_pos.shape[0], -1, np.int64)
    for b, (s, e) in enumerate(geo.blocks):
        blk[(key_pos >= s) & (key_pos < e)] = b
    q_blk = blk[key_pos.shape[0] - T :].copy()
    out = np.empty((T, Hq, hd), np.float32)
    for h in range(Hkv):
        keys = np.concatenate([k_cache[batch, h, slots], k_new[:, h]]).astype(np.float32)
        vals = np.concatenate([v_cache[batch, h, slots], v_new[:, h]]).astype(np.float32)
        qh = np.ascontiguousarray(q[:, h * G : (h + 1) * G], np.float32).reshape(T * G, hd)
        s = hostmath.matmul(qh, keys.T)  # the fixed summation order of any host (hostmath)
        _masked_softmax(s, G, q_start, key_pos, blk, q_blk, window or 0, np.float32(scale))
        out[:, h * G : (h + 1) * G] = hostmath.matmul(s, vals).reshape(T, G, hd)
    return out


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Plan:
    hg: int  # query heads stacked per item (rows of the matrix unit: hg * tq)
    tq: int  # queries per item
    tk: int  # keys per tile


@dataclass
class Item:
    h: int  # kv head
    g0: int  # first query head of the group, within the kv head's G
    gl: int
    t0: int  # first query of the tile, within the chunk
    tl: int
    segs: list
    klo: int
    khi: int
    steps: list  # (k0, kl) absolute key positions

    @property
    def m(self) -> int:
        return self.gl * self.tl


def _divisors(n: int):
    return [d for d in range(1, n + 1) if n % d == 0]


def make_items(geo: Geometry, plan: Plan) -> list[Item]:
    per_tile = []  # masks do not depend on the head: work them out once per query tile
    for t0, tl in tiles(geo.T, plan.tq):
        a = geo.q_start + t0
        segs = row_segments(geo, a, a + tl)
        klo, khi = key_range(geo, segs)
        per_tile.append((t0, tl, segs, klo, khi, [(klo + s, n) for s, n in tiles(khi - klo, plan.tk)]))
    items = []
    for h in range(geo.Hkv):
        for g0, gl in tiles(geo.G, plan.hg):
            for t0, tl, segs, klo, khi, steps in per_tile:
                items.append(Item(h, g0, gl, t0, tl, segs, klo, khi, steps))
    return items


def _mm_cycles(cfg, m, k, n) -> int:
    """Matrix-unit cycles of (m, k) @ (k, n) in chunks within the unit's limits (no fill)."""
    c = 0
    for _, kc in tiles(k, cfg.matmul_max_k):
        for _, nc in tiles(n, cfg.matmul_max_n):
            c += ceil_div(kc, cfg.mac_rows) * ceil_div(nc, cfg.mac_cols) * max(m, cfg.mac_rows)
    return c


def _vec(cfg, n) -> int:
    return cfg.vector_latency + ceil_div(n, cfg.vector_lanes)


def _step_cycles(cfg, geo: Geometry, m: int, kl: int, n_sel: int) -> float:
    """Rough cycles of one key tile on one engine: the busiest of its units."""
    return _step_cycles_hd(cfg, geo.hd, m, kl, n_sel)


@functools.lru_cache(maxsize=4096)
def _step_cycles_hd(cfg, hd: int, m: int, kl: int, n_sel: int) -> float:
    mm = _mm_cycles(cfg, m, hd, kl) + _mm_cycles(cfg, m, kl, hd)
    sfu = 2 * cfg.sfu_latency + ceil_div(m * kl, cfg.sfu_lanes) + ceil_div(m, cfg.sfu_lanes)
    vec = (2 + n_sel) * _vec(cfg, m * kl) + _vec(cfg, m * hd) + 4 * _vec(cfg, m)
    return max(mm, sfu, vec)


def _item_cost(cfg, geo: Geometry, it: Item) -> float:
    cost = 0.0
    for k0, kl in it.steps:
        n_sel = sum(len(selects(geo, p0, p1, lo, hi, k0, k0 + kl)) for p0, p1, lo, hi in it.segs)
        cost += _step_cycles(cfg, geo, it.m, kl, n_sel)
    return cost + _vec(cfg, it.m * geo.hd)


def assign(cfg, geo: Geometry, items: list[Item]) -> tuple[list[list[int]], list[float]]:
    """Items to engines, kv head by kv head: within a head longest item first to the
    least-loaded engine. Engines then work through the heads roughly in step, so a head's
    keys staged in shared SRAM serve every engine while they are wanted; each engine takes
    its items in (head, query) order."""
    memo: dict = {}  # items of other heads with the same rows and keys cost the same
    costs = []
    for it in items:
        key = (it.gl, it.t0, it.tl)
        if key not in memo:
            memo[key] = _item_cost(cfg, geo, it)
        costs.append(memo[key])
    loads = [0.0] * cfg.num_engines
    owned: list[list[int]] = [[] for _ in range(cfg.num_engines)]
    for h in range(geo.Hkv):
        mine = [i for i, it in enumerate(items) if it.h == h]
        for i in sorted(mine, key=lambda i: (-costs[i], i)):
            e = min(range(cfg.num_engines), key=lambda e: (loads[e], e))
            loads[e] += costs[i]
            owned[e].append(i)
    return [sorted(o) for o in owned], loads


def _staged_heads(cfg, geo: Geometry, items: list[Item], owned) -> dict[int, tuple[int, int]]:
    """kv heads read by several engines that fit in shared SRAM -> staged key range [lo, hi)."""
    engines: dict[int, set] = {}
    for e, idx in enumerate(owned):
        for i in idx:
            engines.setdefault(items[i].h, set()).add(e)
    staged, used = {}, 0
    esz = itemsize(geo.dtype)
    for h in sorted(engines):
        if len(engines[h]) < 2:
            continue
        lo = min(it.klo for it in items if it.h == h)
        hi = max(it.khi for it in items if it.h == h)
        need = 2 * _aligned(cfg, (hi - lo) * geo.hd * esz)
        if used + need <= cfg.shared_sram_bytes:
            staged[h] = (lo, hi)
            used += need
    return staged


def _aligned(cfg, nbytes: int) -> int:
    a = cfg.sram_alignment
    return max(a, ceil_div(nbytes, a) * a)


def sram_bytes(cfg, geo: Geometry, plan: Plan) -> int:
    """Local SRAM one engine allocates for this plan."""
    m, hd, tk, esz = plan.hg * plan.tq, geo.hd, plan.tk, itemsize(geo.dtype)
    b = 2 * _aligned(cfg, m * hd * esz) + 6 * _aligned(cfg, hd * tk * esz)
    b += 2 * _aligned(cfg, m * tk * 4) + 2 * _aligned(cfg, m * tk * esz)
    b += 2 * _aligned(cfg, m * hd * 4) + 2 * _aligned(cfg, m * hd * esz)
    return b + 14 * _aligned(cfg, m * 4)


def estimate(cfg, geo: Geometry, plan: Plan) -> float:
    """Rough cycles: the busiest engine (plus pipeline fill) or DRAM, whichever is slower."""
    items = make_items(geo, plan)
    owned, loads = assign(cfg, geo, items)
    staged = _staged_heads(cfg, geo, items, owned)
    esz = itemsize(geo.dtype)
    kv = sum(2 * (hi - lo) * geo.hd * esz for lo, hi in staged.values())
    kv += sum(2 * (it.khi - it.klo) * geo.hd * esz for it in items if it.h not in staged)
    dram = (2 * geo.T * geo.Hq * geo.hd * esz + kv) / cfg.dram_bytes_per_cycle
    m = plan.hg * plan.tq
    fill = 2 * cfg.dma_dram_latency + (m + plan.tk) * geo.hd * esz / cfg.dma_queue_bytes_per_cycle
    fill += _step_cycles(cfg, geo, m, plan.tk, 0) + cfg.mac_fill_drain
    # One cycle per item and tile over the chip breaks ties towards fewer instructions.
    return max(max(loads) + fill, dram) + sum(len(it.steps) for it in items)


def candidates(cfg, geo: Geometry):
    """Plans within the unit limits and local SRAM, with at least mac_rows rows per matmul
    where the shape allows (fewer rows cost a pass all the same)."""
    tqs = {geo.T} | {ceil_div(geo.T, n) for n in range(1, 4 * cfg.num_engines + 1)}
    tqs |= {1 << i for i in range(geo.T.bit_length())}
    min_m = min(cfg.mac_rows, geo.G * geo.T, cfg.matmul_max_m)
    out = []
    for hg in _divisors(geo.G):
        for tq in sorted(tqs):
            m = hg * tq
            if m > cfg.matmul_max_m or tq > geo.T or m < min_m:
                continue
            tk_cap = min(cfg.matmul_max_n, cfg.vector_max_elements // m)
            if tk_cap < 1:
                continue
            tks = {tk_cap} | {cfg.mac_rows << i for i in range(12) if cfg.mac_rows << i < tk_cap}
            for tk in sorted(tks):
                plan = Plan(hg, tq, tk)
                if sram_bytes(cfg, geo, plan) <= cfg.local_sram_bytes:
                    out.append(plan)
    return out


STAGE_AHEAD = 1  # key tiles staged into shared SRAM beyond the two being loaded
TRIALS = 3  # best-estimated plans scheduled per shape ...
TRIAL_INSTRUCTIONS = 30_000  # ... while their instruction streams stay this short in total


@functools.lru_cache(maxsize=256)
def choose_plan(cfg, geo: Geometry) -> Plan:
    """Rank the candidate plans by ``estimate``, schedule the best few (trace only, no
    values) and keep the fastest."""
    cands = candidates(cfg, geo)
    if not cands:
        raise KernelError(
            f"attention_prefill: no tiling of hd = {geo.hd} fits {cfg.local_sram_bytes} B of local "
            f"SRAM on {cfg.name!r}"
        )
    ranked = sorted(cands, key=lambda p: (estimate(cfg, geo, p), p.tk, p.tq, p.hg))
    trials, budget = [], TRIAL_INSTRUCTIONS
    for plan in ranked[:TRIALS]:
        budget -= _instructions(geo, plan)
        if budget < 0:
            break
        trials.append(plan)
    if len(trials) < 2:  # nothing to compare: trust the estimate
        return ranked[0]
    return min(trials, key=lambda p: _trial(cfg, geo, p))


def _instructions(geo: Geometry, plan: Plan) -> int:
    """About how many instructions the plan emits (a dozen per key tile)."""
    return 12 * sum(len(it.steps) for it in make_items(geo, plan))


def _trial(cfg, geo: Geometry, plan: Plan) -> float:
    from npu_emulator.memory import DRAM, Buffer
    from npu_emulator.timing import schedule

    ctx = KernelContext("attention-trial", cfg, execute=False, dtype=geo.dtype)
    T, Hq, Hkv, hd, S = geo.T, geo.Hq, geo.Hkv, geo.hd, geo.S
    shapes = [(T, Hq, hd), (T, Hkv, hd), (T, Hkv, hd), (1, Hkv, S, hd), (1, Hkv, S, hd)]
    bufs = [Buffer(f"in{i}", DRAM, s, geo.dtype, 0, 0) for i, s in enumerate(shapes)]
    _emit(ctx, *bufs, geo=geo, plan=plan, scale=1.0, batch=0)
    return schedule(ctx.stream(), cfg).total


# --------------------------------------------------------------------------- emit


def engine_queues(cfg, engine: int) -> dict[str, int]:
    """DMA queues of one engine by role: its share of the queues, roles spread over them."""
    per = max(1, cfg.dma_queues // cfg.num_engines)
    qs = [(engine * per + i) % cfg.dma_queues for i in range(per)]
    # K^T tiles (needed soonest, by the next score matmul) get a queue of their own; Q, V and
    # the output share the rest: a queue moves its descriptors' bytes in order.
    rest = qs[1:] or qs
    return {"k": qs[0], "q": rest[0], "v": rest[1 % len(rest)], "out": rest[2 % len(rest)]}


class _Sources:
    """Where key positions live: cache slots (a ring wraps) or rows of k_new / v_new."""

    def __init__(self, geo: Geometry, k_new, v_new, k_cache, v_cache, batch: int):
        self.geo, self.batch = geo, batch
        self.k_new, self.v_new, self.k_cache, self.v_cache = k_new, v_new, k_cache, v_cache

    def runs(self, p0: int, p1: int):
        """(position, count, source, index) runs of contiguous storage covering [p0, p1)."""
        geo = self.geo
        p = p0
        while p < min(p1, geo.q_start):
            slot = p % geo.S if geo.ring else p
            n = min(p1, geo.q_start, p + geo.S - slot)
            yield p, n - p, "cache", slot
            p = n
        if p < p1:
            yield p, p1 - p, "new", p - geo.q_start

    def k_t(self, h: int, src: str, idx: int, n: int):
        """K^T (hd, n) of n keys: a transposing strided region of k_cache or k_new."""
        geo = self.geo
        if src == "cache":
            off = ((self.batch * geo.Hkv + h) * geo.S + idx) * geo.hd
            return self.k_cache.region(off, (geo.hd, n), (1, geo.hd))
        return self.k_new.region((idx * geo.Hkv + h) * geo.hd, (geo.hd, n), (1, geo.Hkv * geo.hd))

    def v(self, h: int, src: str, idx: int, n: int):
        if src == "cache":
            return self.v_cache[self.batch, h, idx : idx + n, :]
        return self.v_new[idx : idx + n, h, :]


class _Stager:
    """K^T and V of kv heads read by several engines, copied once into shared SRAM in chunks
    of ``chunk`` keys ahead of first use, each chunk in pieces over the engines' V queues,
    enough of them to move at the full DRAM bandwidth."""

    def __init__(self, k, src: _Sources, staged: dict, chunk: int, dtype: str):
        self.k, self.src, self.chunk = k, src, chunk
        hd = src.geo.hd
        self.base = {h: lo for h, (lo, _) in staged.items()}
        self.end = {h: hi for h, (_, hi) in staged.items()}
        self.kt = {
            h: k.alloc((hd, hi - lo), dtype, shared=True, name=f"kt_sh{h}") for h, (lo, hi) in staged.items()
        }
        self.v = {
            h: k.alloc((hi - lo, hd), dtype, shared=True, name=f"v_sh{h}") for h, (lo, hi) in staged.items()
        }
        self.done: set = set()
        # Shared copies go on the engines' V queues, whose loads are needed latest.
        self.queues = sorted({engine_queues(k.config, e)["v"] for e in k.engines})
        self.next_queue = 0

    def ensure(self, h: int, p0: int, p1: int, kinds=("k", "v")) -> None:
        k, cfg, base = self.k, self.k.config, self.base[h]
        for c in range((p0 - base) // self.chunk, ceil_div(p1 - base, self.chunk)):
            c0, c1 = base + c * self.chunk, min(self.end[h], base + (c + 1) * self.chunk)
            # Enough pieces on as many queues to move at the full DRAM bandwidth.
            pieces = min(cfg.dma_queues, math.ceil(cfg.dram_bytes_per_cycle / cfg.dma_queue_bytes_per_cycle))
            piece = ceil_div(c1 - c0, pieces)
            for kind in kinds:
                if (h, c, kind) in self.done:
                    continue
                self.done.add((h, c, kind))
                for s0, sl in tiles(c1 - c0, piece):
                    for pos, n, where, idx in self.src.runs(c0 + s0, c0 + s0 + sl):
                        j = pos - base
                        if kind == "k":
                            k.dma(
                                self.kt[h][:, j : j + n], self.src.k_t(h, where, idx, n), queue=self._queue()
                            )
                        else:
                            k.dma(self.v[h][j : j + n, :], self.src.v(h, where, idx, n), queue=self._queue())

    def _queue(self) -> int:
        q = self.queues[self.next_queue]
        self.next_queue = (self.next_queue + 1) % len(self.queues)
        return q


def attention_prefill_emit(
    k, q, k_new, v_new, k_cache, v_cache, *, q_start, scale, window=None, ring=False, batch=0, image_blocks=()
):
    dtypes = {b.dtype for b in (q, k_new, v_new, k_cache, v_cache)}
    if len(dtypes) != 1:
        raise KernelError(f"attention_prefill: inputs must share one dtype, got {sorted(dtypes)}")
    if not scale > 0:
        raise KernelError(f"attention_prefill: scale must be positive, got {scale}")
    geo = geometry(
        q.shape,
        k_new.shape,
        k_cache.shape,
        q_start=q_start,
        window=window,
        ring=ring,
        batch=batch,
        image_blocks=image_blocks,
        dtype=q.dtype,
    )
    if v_cache.shape != k_cache.shape or v_new.shape != k_new.shape:
        raise KernelError("attention_prefill: v_new / v_cache must have the shapes of k_new / k_cache")
    plan = choose_plan(k.config, geo)
    k.set_roofline_bytes(compulsory_bytes(geo))
    return _emit(k, q, k_new, v_new, k_cache, v_cache, geo=geo, plan=plan, scale=scale, batch=batch)


def compulsory_bytes(geo: Geometry) -> int:
    """DRAM bytes no schedule can avoid: q, the chunk's k and v, out, and the cache's K and V
    at the positions some query of the chunk sees (not the whole cache)."""
    elt = itemsize(geo.dtype)
    lo = min(_row_interval(geo, p)[0] for p in range(geo.q_start, geo.q_end))
    cached = max(0, geo.q_start - max(lo, geo.c_lo))
    chunk = geo.T * (2 * geo.Hq + 2 * geo.Hkv) * geo.hd  # q, out, k_new, v_new
    return (chunk + 2 * geo.Hkv * cached * geo.hd) * elt


def _emit(k, q, k_new, v_new, k_cache, v_cache, *, geo: Geometry, plan: Plan, scale: float, batch: int):
    cfg = k.config
    out = k.output((geo.T, geo.Hq, geo.hd), q.dtype, name="out")
    items = make_items(geo, plan)
    owned, _ = assign(cfg, geo, items)
    staged = _staged_heads(cfg, geo, items, owned)
    src = _Sources(geo, k_new, v_new, k_cache, v_cache, batch)
    stager = _Stager(k, src, staged, plan.tk, q.dtype) if staged else None
    if stager is not None:  # K^T of every engine's first two tiles ahead of all else
        for idx in owned:
            it = items[idx[0]] if idx else None
            if it is not None and it.h in stager.kt:
                for k0, kl in it.steps[:2]:
                    stager.ensure(it.h, k0, k0 + kl, ("k",))
    programs = [
        _engine_program(k, e, [items[i] for i in idx], q, out, src, stager, geo, plan, scale)
        for e, idx in enumerate(owned)
        if idx
    ]
    interleave(programs)
    return out


def _out_chunk(cfg, hd: int) -> int:
    """Column chunk of the last tile's P @ V: whole MAC-array widths, about four per head."""
    return min(cfg.matmul_max_n, max(cfg.mac_cols, ceil_div(ceil_div(hd, 4), cfg.mac_cols) * cfg.mac_cols))


def _row_chunks(cfg, rows: int, width: int):
    """Row ranges of a (rows, width) vector operand within vector_max_elements."""
    return tiles(rows, max(1, cfg.vector_max_elements // max(1, width)))


def _engine_program(k, e, items, q, out, src: _Sources, stager, geo: Geometry, plan: Plan, scale: float):
    cfg = k.config
    dt, hd, tk, G = q.dtype, geo.hd, plan.tk, geo.G
    mmax = max(it.m for it in items)
    qu = engine_queues(cfg, e)
    # Large finite stand-in for -inf as the first running max (see the module docstring).
    big = 1e30 / max(1.0, scale)

    def buf(shape, dtype, name, n):
        return [k.alloc(shape, dtype, engine=e, name=f"{name}{s}_e{e}") for s in range(n)]

    q_t = buf((mmax, hd), dt, "q", 2)
    kt_t = buf((hd, tk), dt, "kt", 3)
    v_t = buf((tk, hd), dt, "v", 3)
    s_t = buf((mmax, tk), "fp32", "s", 2)
    p_t = buf((mmax, tk), dt, "p", 2)
    acc_t = buf((mmax, hd), "fp32", "acc", 2)
    o_t = buf((mmax, hd), dt, "o", 2)
    m_t = [buf((mmax, 1), "fp32", f"m{i}_", 2) for i in range(2)]  # [item parity][tile parity]
    l_t = buf((mmax, 1), "fp32", "l", 2)
    mx_t = buf((mmax, 1), "fp32", "rowmax", 2)
    nb_t = buf((mmax, 1), "fp32", "negmax", 2)
    al_t = buf((mmax, 1), "fp32", "alpha", 2)
    rs_t = buf((mmax, 1), "fp32", "rowsum", 2)

    # Flat list of steps: (item index, tile index within the item, k0, kl).
    steps = [(i, j, k0, kl) for i, it in enumerate(items) for j, (k0, kl) in enumerate(it.steps)]

    def load_q(n: int):
        i, j, _, _ = steps[n]
        if j == 0:
            it = items[i]
            for g in range(it.gl):  # per head: slices, so dependencies stay exact
                rows = slice(g * it.tl, (g + 1) * it.tl)
                k.dma(q_t[i % 2][rows, :], q[it.t0 : it.t0 + it.tl, it.h * G + it.g0 + g, :], queue=qu["q"])

    def load(n: int, with_q=True):
        i, j, k0, kl = steps[n]
        it = items[i]
        if with_q:
            load_q(n)
        kt, v = kt_t[n % 3], v_t[n % 3]
        if stager is not None and it.h in stager.kt:
            stager.ensure(it.h, k0, k0 + kl)
            c0 = k0 - stager.base[it.h]
            k.dma(kt[:, :kl], stager.kt[it.h][:, c0 : c0 + kl], queue=qu["k"])
            k.dma(v[:kl, :], stager.v[it.h][c0 : c0 + kl, :], queue=qu["v"])
        else:
            for pos, cnt, where, idx in src.runs(k0, k0 + kl):
                j0 = pos - k0
                k.dma(kt[:, j0 : j0 + cnt], src.k_t(it.h, where, idx, cnt), queue=qu["k"])
                k.dma(v[j0 : j0 + cnt, :], src.v(it.h, where, idx, cnt), queue=qu["v"])

    def stage(n: int):
        _, _, k0, kl = steps[n]
        h = items[steps[n][0]].h
        if stager is not None and h in stager.kt:
            stager.ensure(h, k0, k0 + kl)

    def scores(n: int):
        i, _, _, kl = steps[n]
        m, qb, kt, s = items[i].m, q_t[i % 2], kt_t[n % 3], s_t[n % 2]
        for d0, dl in tiles(hd, cfg.matmul_max_k):
            k.matmul(s[:m, :kl], qb[:m, d0 : d0 + dl], kt[d0 : d0 + dl, :kl], accumulate=d0 > 0)

    def softmax_pv(n: int):
        i, j, k0, kl = steps[n]
        it = items[i]
        m, s, p, acc, l_ = it.m, s_t[n % 2], p_t[n % 2], acc_t[i % 2], l_t[i % 2]
        mx, nb, al, rs = mx_t[n % 2][:m], nb_t[n % 2][:m], al_t[n % 2][:m], rs_t[n % 2][:m]
        m_new, m_old = m_t[i % 2][j % 2][:m], m_t[i % 2][(j - 1) % 2][:m]
        a = geo.q_start + it.t0
        for p0, p1, lo, hi in it.segs:  # mask edges crossing this tile, rows split by rule
            for off, rc, cc in selects(geo, p0, p1, lo, hi, k0, k0 + kl):
                view = s.region((p0 - a) * tk, (it.gl, p1 - p0, kl), (it.tl * tk, tk, 1))
                k.select(view, view, offset=off, row_coef=rc, col_coef=cc)
        k.reduce("max", mx, s[:m, :kl])
        if j == 0:
            k.vector("max", m_new, mx, -big)
        else:
            k.vector("max", m_new, m_old, mx)
        k.vector("mul", nb, m_new, -scale)
        if j > 0:
            k.activation("exp", al, m_old, scale=scale, bias=nb)  # exp(scale * (m_old - m_new))
        k.activation("exp", p[:m, :kl], s[:m, :kl], scale=scale, bias=nb)  # fp32 -> bf16 P
        if j == 0:
            k.reduce("sum", l_[:m], p[:m, :kl])
        else:
            k.reduce("sum", rs, p[:m, :kl])
            k.vector("mul", l_[:m], l_[:m], al)
            k.vector("add", l_[:m], l_[:m], rs)
            for r0, rl in _row_chunks(cfg, m, hd):
                k.vector("mul", acc[r0 : r0 + rl, :], acc[r0 : r0 + rl, :], al[r0 : r0 + rl])
        last = j == len(it.steps) - 1
        vt, o = v_t[n % 3], o_t[i % 2]
        # The last tile goes column chunk by column chunk, each normalised, cast and written
        # out as soon as its matmuls finish, so the output leaves while the rest computes.
        cw = _out_chunk(cfg, hd) if last else cfg.matmul_max_n
        for d0, dl in tiles(hd, cw):
            for c0, cl in tiles(kl, cfg.matmul_max_k):
                k.matmul(
                    acc[:m, d0 : d0 + dl],
                    p[:m, c0 : c0 + cl],
                    vt[c0 : c0 + cl, d0 : d0 + dl],
                    accumulate=j > 0 or c0 > 0,
                )
            if last:
                for r0, rl in _row_chunks(cfg, m, dl):
                    rows = slice(r0, r0 + rl)
                    k.vector("div", o[rows, d0 : d0 + dl], acc[rows, d0 : d0 + dl], l_[rows])
                for g in range(it.gl):
                    k.dma(
                        out[it.t0 : it.t0 + it.tl, it.h * G + it.g0 + g, d0 : d0 + dl],
                        o[g * it.tl : (g + 1) * it.tl, d0 : d0 + dl],
                        queue=qu["out"],
                    )

    n_steps = len(steps)
    load_q(0)  # every engine's first Q before any K / V: the first matmuls need it most
    yield
    for n in range(min(2, n_steps)):
        load(n, with_q=n > 0)
    scores(0)
    yield
    for n in range(n_steps):
        if n + 2 < n_steps:
            load(n + 2)
        for ahead in range(n + 3, min(n + 3 + STAGE_AHEAD, n_steps)):  # shared copies run ahead
            stage(ahead)
        if n + 1 < n_steps:
            scores(n + 1)
        softmax_pv(n)
        yield


attention_prefill = Kernel(
    "attention_prefill", attention_prefill_emit, attention_prefill_fast, attention_prefill_reference
)

__all__ = [
    "attention_prefill",
    "attention_prefill_emit",
    "attention_prefill_fast",
    "attention_prefill_reference",
    "choose_plan",
    "geometry",
    "visible_flops",
    "Plan",
]
