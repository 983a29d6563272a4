"""Attention for decode: one new query token per sequence against a KV cache (flash-decoding).

For every sequence b and query head h, with kv head g = h // (Hq // Hkv)::

    out[b, h] = softmax(scale * q[b, h] @ k_cache[b, g, :L].T + mask[b]) @ v_cache[b, g, :L]

IO (DRAM): q (B, Hq, hd), one already normed and rotated query per sequence; k_cache and
v_cache (B, Hkv, S, hd); mask (B, L) additive bias (fp32, or the device dtype): 0 where slot j
of sequence b is visible, -inf or a large negative (-1e30) where not. Only slots [0, L) are
read, L <= S, so one kernel serves global caches (slot = position) and sliding-window ring
buffers (slot = position % S): the host's mask says which slots hold what (left padding, the
window, ring slots not yet written). out (B, Hq, hd) in q's dtype. q, k_cache and v_cache share
one float dtype (the device dtype, bf16). Compile-time constant: scale.

Any window W works with whole tiles: the ring holds S = ceil(W / tile) * tile slots (the model
rounds W up, gemma3/runtime.py), so its slots past the window hold the S - W positions just
before it, which the mask hides. Once the ring has wrapped a step reads all S slots, W plus
at most tile - 1 masked ones, as whole tiles: the bytes the hardware would move.

L must be a multiple of ``decode_kv_tile(cfg)`` (one MAC block of contraction rows); the cost
depends only on the shapes (B, Hq, Hkv, hd, S, L), so a model caches one report per tile count.

Plan (every size from ``k.config``; ``decode_plan``):

* The B * Hkv * L / tile KV tiles are split into equal contiguous ranges, one per engine, so
  every engine streams the same bytes even when B * Hkv < engines (Gemma 3 270M: B = Hkv = 1).
  An engine's range cuts each (b, g) into a *piece*; a piece holds all G = Hq / Hkv query heads
  of its kv head, so K and V are read once per GQA group.
* Per piece, scores ``s (G, n) = q (G, hd) @ K^T (hd, n)`` chunk by chunk (K^T arrives by a
  transposing DMA, in slices of contraction rows so the matmul follows the bytes), then one
  softmax pass over the piece in fp32 (scale and mask on the SFU, row max, exp into a bf16 P,
  row sum), then ``o (G, hd) += P (G, c) @ V (c, hd)`` chunk by chunk. All K chunks of a piece
  are loaded before its V chunks, so V keeps streaming while the softmax runs. The last chunk
  is one KV tile, loaded and multiplied in MAC-column slices, so the work left after the last
  byte lands is one small matmul, one vector op and the store.
* A (b, g) held by one piece is finished on its engine: ``out = o / l``. A (b, g) cut into P
  pieces (several engines, or an engine's segment longer than its SRAM allows) is combined
  on the engine of its last piece: every piece sends its max m, sum l and unnormalised o by
  local-to-local DMA (the combiner's own pieces write in place), the weights
  ``c_p = exp(m_p - M) / sum_p l_p exp(m_p - M)`` are ready once the K phases end, and each
  MAC-column slice of ``out = sum_p c_p o_p`` is summed and stored as soon as it arrives.
* Each engine loads K and V on its own DMA queue(s) and uses one more queue for q, the mask,
  the partials and the stores; K^T and V chunks cycle through ``depth`` SRAM slots each.
  Query rows read by several pieces, and mask rows read by several kv heads, come from DRAM
  once through shared SRAM. Engines' programs are interleaved chunk by chunk in program order.

Why the matrix unit for one query token: a pass costs max(G, mac_rows) cycles, so with M = G
it is weight-load bound, but scores and P @ V together still cost only 2 * hd / mac_cols
cycles per slot (16 on atom at hd = 256) against 4 * hd / (DRAM bytes per cycle / engines)
cycles to load the slot's K and V (32): half busy and hidden behind the DMA. The vector unit
would need a multiply and a reduction per head (G * 2 * hd / vector_lanes per slot for the
scores alone: 16 at G = 4) and cannot contract P @ V over rows without V transposed.

SRAM per engine: 2 x depth chunk buffers (C x hd, device dtype) for K^T and V; per piece (two
live at once) s (G, n) fp32, P (G, n), the mask (1, n), q (G, hd), o (G, hd) fp32 and the
output tile, within half the local SRAM (n is capped to fit); at most two live combiners,
each (G, hd, P) fp32 partials plus two (G, mac_cols, P) products, in the other half. Shared
SRAM: the staged query rows and mask rows.
FLOPs (matrix unit): 4 * B * Hq * L * hd (scores and P @ V). DRAM traffic: exactly the
compulsory bytes, 2 * B * Hkv * L * hd * elt for K and V slots [0, L) plus q, the mask and
out once each (slots [L, S) are never read): decode is memory bound. The kernel declares these
bytes (``set_roofline_bytes``), so the report's roofline is that of the L slots, not of the
whole (B, Hkv, S, hd) caches.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numba
import numpy as np

from npu_emulator import Kernel, KernelError
from npu_emulator.fixedmath import exp32
from npu_emulator.memory import itemsize
from npu_emulator.program import ceil_div, tiles

from .common import interleave, split

# Floor of a row max. A piece whose slots are all masked with -inf then has m = NEG and
# exp(-inf - NEG) = 0 (no NaN from -inf - -inf); its weight in the combine is exp(NEG - M) = 0.
NEG = -1e30
DEPTH = 3  # K^T and V chunk slots per engine


def decode_kv_tile(cfg) -> int:
    """The KV tile: L must be a multiple of it. One MAC block of contraction rows."""
    return min(cfg.mac_rows, cfg.matmul_max_k, cfg.matmul_max_n)


# ----------------------------------------------------------------------------- references


def attention_decode_reference(q, k_cache, v_cache, mask, *, scale):
    """Plain float64 NumPy: softmax(scale * q k^T + mask) v over slots [0, L)."""
    b, hq, hd = q.shape
    hkv, big_l = k_cache.shape[1], mask.shape[1]
    qg = q.astype(np.float64).reshape(b, hkv, hq // hkv, hd)
    keys = k_cache[:, :, :big_l].astype(np.float64)
    vals = v_cache[:, :, :big_l].astype(np.float64)
    s = scale * qg @ keys.swapaxes(-1, -2) + mask.astype(np.float64)[:, None, None, :]
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return (p @ vals).reshape(b, hq, hd)


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _decode_heads(q, k_cache, v_cache, mask, scale, out):
    """Each (b, query head) in parallel: scores over the L slots, softmax, weighted values (fp32)."""
    b_n, hq, hd = q.shape
    hkv, big_l = k_cache.shape[1], mask.shape[1]
    g_n = hq // hkv
    for bh in numba.prange(b_n * hq):
        b, h = bh // hq, bh % hq
        g = h // g_n
        s = np.empty(big_l, np.float32)
        m = np.float32(NEG)  # a finite start: a row with no visible slot gives 0 / 0 = NaN
        for j in range(big_l):
            dot = np.float32(0.0)
            for d in range(hd):
                dot += q[b, h, d] * k_cache[b, g, j, d]
            s[j] = dot * scale + mask[b, j]
            m = max(m, s[j])
        total = np.float32(0.0)
        acc = np.zeros(hd, np.float32)
        for j in range(big_l):
            p = exp32(s[j] - m)
            total += p
            if p != 0.0:
                for d in range(hd):
                    acc[d] += p * v_cache[b, g, j, d]
        for d in range(hd):
            out[b, h, d] = acc[d] / total


def attention_decode_fast(q, k_cache, v_cache, mask, *, scale):
    """The whole op in float32, one Numba thread per (sequence, query head): decode steps
    stay in one thread pool with the weight streaming (see npu_kernels/hostmath.py)."""
    out = np.empty(q.shape, np.float32)
    _decode_heads(
        np.ascontiguousarray(q, dtype=np.float32),
        np.asarray(k_cache, dtype=np.float32),
        np.asarray(v_cache, dtype=np.float32),
        np.ascontiguousarray(mask, dtype=np.float32),
        np.float32(scale),
        out,
    )
    return out


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Piece:
    """Slots [l0, l0 + n) of (b, g) on one engine; the p-th of ``count`` pieces of (b, g),
    combined on engine ``combiner`` (that of the last piece) when count > 1."""

    engine: int
    b: int
    g: int
    l0: int
    n: int
    p: int = 0
    count: int = 1
    combiner: int = 0


@dataclass(frozen=True)
class DecodePlan:
    tile: int  # KV tile (slots)
    chunk: int  # slots per K^T / V chunk (a multiple of tile)
    depth: int  # chunk slots per engine, for K^T and for V
    k_rows: int  # contraction rows per K^T slice (one DMA + one matmul each)
    v_cols: int  # columns per V slice (one DMA + one matmul each)
    max_piece: int  # slots per piece at most (SRAM)
    pieces: tuple  # per engine: tuple of Piece, in order
    queues: tuple  # per engine: (load queues tuple, misc queue)


def combiner_bytes(group: int, hd: int, count: int, v_cols: int, esz: int) -> int:
    """Local SRAM of one combiner: partial outputs, two product slices, weights, output rows."""
    return 4 * group * count * (hd + 2 * v_cols + 4) + group * hd * esz + 8 * group + 64 * 10


@functools.lru_cache(maxsize=256)
def decode_plan(
    cfg, batch: int, n_kv: int, group: int, hd: int, length: int, esz: int, mask_esz: int, partition=None
):
    """Split the work over engines and pick chunk sizes; see the module docstring. With a
    ``partition`` (slots, a multiple of the KV tile: the flash-attention kernel,
    npu_kernels/attention_decode_flash.py) no piece crosses a partition boundary."""
    tile = decode_kv_tile(cfg)
    fit = max(1, min(cfg.matmul_max_n, cfg.matmul_max_k) // tile)
    chunk, depth = tile * min(4, fit), DEPTH
    v_cols = min(cfg.mac_cols, cfg.matmul_max_n)
    budget = cfg.local_sram_bytes // 2  # rings and two live pieces; the other half: combiners
    while 2 * depth * chunk * hd * esz > budget // 2 and (chunk > tile or depth > 2):
        chunk, depth = (chunk - tile, depth) if chunk > tile else (chunk, depth - 1)
    rings = 2 * depth * chunk * hd * esz
    per_slot = 4 * group + esz * group + mask_esz  # s (fp32), P, mask
    fixed = group * hd * (2 * esz + 4) + 64 * 8  # q, out tile, o, scalars
    max_piece = (budget - rings - 2 * fixed) // (2 * per_slot) // tile * tile
    if max_piece < tile:
        raise KernelError(
            f"attention_decode: a piece of one KV tile ({tile} slots, G={group}, hd={hd}) with "
            f"{depth} x 2 chunk buffers does not fit half of {cfg.local_sram_bytes} B of local SRAM"
        )
    nt = length // tile
    ranges = split(batch * n_kv * nt, cfg.num_engines)
    by_bg: dict[tuple[int, int], list] = {}
    per_engine = []
    for e, (t0, tl) in enumerate(ranges):
        mine, t = [], t0
        while t < t0 + tl:
            bg, within = divmod(t, nt)
            seg = min(t0 + tl, (bg + 1) * nt) - t
            if partition:  # end the segment at its partition's last tile
                per = partition // tile
                seg = min(seg, (within // per + 1) * per - within)
            for s0, sl in split(seg, ceil_div(seg * tile, max_piece)):
                piece = dict(engine=e, b=bg // n_kv, g=bg % n_kv, l0=(within + s0) * tile, n=sl * tile)
                mine.append(piece)
                by_bg.setdefault((piece["b"], piece["g"]), []).append(piece)
            t += seg
        per_engine.append(mine)
    most = 1
    for plist in by_bg.values():
        most = max(most, len(plist))
        for p, piece in enumerate(plist):
            piece.update(p=p, count=len(plist), combiner=plist[-1]["engine"])
    # An engine holds at most two combiners at once: one for the (b, g) its range starts in,
    # one for a (b, g) cut into several pieces within its range.
    if most > 1 and 2 * combiner_bytes(group, hd, most, v_cols, esz) > cfg.local_sram_bytes - budget:
        raise KernelError(
            f"attention_decode: combining {most} partials of (G={group}, hd={hd}) needs "
            f"{2 * combiner_bytes(group, hd, most, v_cols, esz)} B, more than half of "
            f"{cfg.local_sram_bytes} B of local SRAM"
        )
    pieces = tuple(tuple(Piece(**d) for d in mine) for mine in per_engine)
    per = max(1, cfg.dma_queues // len(ranges))
    queues = []
    for e in range(len(ranges)):
        qs = [(e * per + i) % cfg.dma_queues for i in range(per)]
        queues.append((tuple(qs[:-1] or qs), qs[-1]))
    return DecodePlan(
        tile=tile,
        chunk=chunk,
        depth=depth,
        k_rows=min(cfg.mac_rows, cfg.matmul_max_k),
        v_cols=v_cols,
        max_piece=max_piece,
        pieces=pieces,
        queues=tuple(queues),
    )


def _chunks(n: int, chunk: int, tile: int):
    """(start, length) chunks of a piece; the last one is a single KV tile (short tail)."""
    body = list(tiles(n - tile, chunk)) if n > tile else []
    return body + [(n - tile, tile)]


def _check(q, k_cache, v_cache, mask, tile):
    if len(q.shape) != 3 or len(k_cache.shape) != 4 or len(mask.shape) != 2:
        raise KernelError(
            f"attention_decode: want q (B, Hq, hd), caches (B, Hkv, S, hd), mask (B, L); got q "
            f"{q.shape}, k_cache {k_cache.shape}, mask {mask.shape}"
        )
    b, hq, hd = q.shape
    _, hkv, s, _ = k_cache.shape
    length = mask.shape[1]
    if k_cache.shape != (b, hkv, s, hd) or v_cache.shape != k_cache.shape or mask.shape[0] != b:
        raise KernelError(
            f"attention_decode: shapes do not agree: q {q.shape}, k_cache {k_cache.shape}, "
            f"v_cache {v_cache.shape}, mask {mask.shape}"
        )
    if hq % hkv:
        raise KernelError(f"attention_decode: Hq = {hq} query heads is not a multiple of Hkv = {hkv}")
    if not 0 < length <= s:
        raise KernelError(f"attention_decode: L = {length} slots must be in [1, S = {s}]")
    if length % tile:
        raise KernelError(
            f"attention_decode: L = {length} is not a multiple of the KV tile {tile} "
            "(decode_kv_tile(cfg)); pad the mask with masked slots"
        )
    if not q.dtype == k_cache.dtype == v_cache.dtype:
        raise KernelError(
            f"attention_decode: q {q.dtype}, k_cache {k_cache.dtype} and v_cache {v_cache.dtype} "
            "must share a dtype"
        )
    return b, hq, hd, hkv, s, length


# ----------------------------------------------------------------------------- the program


class _Combiner:
    """Receives the P partials of one (b, g) on one engine and writes its output rows.

    Made when the first piece of (b, g) starts, freed after its last store. Buffers carry a
    unit axis where a reduction writes or a broadcast reads, so every operand is a plain slice
    (tracked per tile: the slices of one buffer stay independent)."""

    def __init__(self, k, engine, out_rows, group, hd, count, v_cols, queue):
        self.k, self.e, self.out_rows, self.queue, self.count = k, engine, out_rows, queue, count
        alloc = functools.partial(k.alloc, engine=engine)
        tag = f"{out_rows.offset}"
        self.bufs = [
            alloc((group, count), "fp32", name=f"cm{tag}"),
            alloc((group, count), "fp32", name=f"cl{tag}"),
            alloc((group, hd, count), "fp32", name=f"co{tag}"),
            alloc((group, count), "fp32", name=f"cw{tag}"),
            alloc((group, 1, count), "fp32", name=f"cc{tag}"),
            alloc((group, 2), "fp32", name=f"cM{tag}"),
            alloc((group, hd, 1), out_rows.dtype, name=f"cs{tag}"),
        ] + [alloc((group, v_cols, count), "fp32", name=f"ct{i}_{tag}") for i in range(2)]
        self.m, self.l, self.o, self.w, self.c, self.scalars, self.stage = self.bufs[:7]
        self.tmp = self.bufs[7:]
        self.ml_sent = 0
        self.o_sent: dict[int, int] = {}
        self.slices_done = 0
        self.slices = len(list(tiles(hd, v_cols)))

    def sent_ml(self):
        self.ml_sent += 1
        if self.ml_sent < self.count:
            return
        k, c = self.k, self.c[:, 0, :]
        big_m, total = self.scalars[:, 0:1], self.scalars[:, 1:2]
        k.reduce("max", big_m, self.m)  # M = max_p m_p
        k.vector("sub", self.w, self.m, big_m)
        k.activation("exp", self.w, self.w)  # w_p = exp(m_p - M)
        k.vector("mul", c, self.w, self.l)
        k.reduce("sum", total, c)  # sum_p w_p l_p
        k.activation("reciprocal", total, total)
        k.vector("mul", c, self.w, total)  # c_p = w_p / sum

    def sent_o(self, h0: int, hl: int) -> bool:
        """One piece sent columns [h0, h0 + hl); True when the combiner is done."""
        self.o_sent[h0] = self.o_sent.get(h0, 0) + 1
        if self.o_sent[h0] < self.count:
            return False
        k, cfg = self.k, self.k.config
        group, _, count = self.o.shape
        tmp = self.tmp[self.slices_done % 2]
        rows = max(1, cfg.vector_max_elements // (hl * count))
        h = slice(h0, h0 + hl)
        for g0, gl in tiles(group, rows):
            g = slice(g0, g0 + gl)
            k.vector("mul", tmp[g, :hl, :], self.o[g, h, :], self.c[g])
            k.reduce("sum", self.stage[g, h, :], tmp[g, :hl, :])  # cast to the output dtype
        k.dma(self.out_rows[:, h], self.stage[:, h, 0], queue=self.queue)
        self.slices_done += 1
        if self.slices_done < self.slices:
            return False
        for buf in self.bufs:
            k.free(buf)
        return True


def attention_decode_emit(k, q, k_cache, v_cache, mask, *, scale, partition=None):
    """The tiled program; ``partition`` (slots) is the flash-attention kernel's constant
    (npu_kernels/attention_decode_flash.py checks it): pieces end at partition boundaries."""
    cfg = k.config
    b_, hq, hd, hkv, s_len, length = _check(q, k_cache, v_cache, mask, decode_kv_tile(cfg))
    group = hq // hkv
    if group > cfg.matmul_max_m:
        raise KernelError(
            f"attention_decode: {group} query heads per kv head exceed matmul_max_m = {cfg.matmul_max_m}"
        )
    esz = itemsize(k_cache.dtype)
    plan = decode_plan(cfg, b_, hkv, group, hd, length, esz, itemsize(mask.dtype), partition)
    out = k.output((b_, hq, hd), q.dtype, name="out")
    # The roofline's bytes: K and V slots [0, L), q, the mask and out once (not all S slots).
    qo = 2 * b_ * hq * hd * itemsize(q.dtype)
    k.set_roofline_bytes(2 * b_ * hkv * length * hd * esz + qo + mask.size * itemsize(mask.dtype))
    engines_of = {}
    for e, mine in enumerate(plan.pieces):
        for pc in mine:
            engines_of.setdefault((pc.b, pc.g), []).append(e)
    # What several pieces read (a (b, g)'s query rows when it is cut, a mask row when Hkv > 1)
    # comes from DRAM once, staged in shared SRAM, on the queue of the first engine to need it.
    q_src, mask_src = {}, {}
    stage_mask = hkv > 1 and mask.size * itemsize(mask.dtype) <= cfg.shared_sram_bytes // 2
    for (b, g), engines in engines_of.items():
        first_q = plan.queues[engines[0]][1]
        rows = q[b, g * group : (g + 1) * group, :]
        if len(engines) > 1:
            q_src[b, g] = k.alloc((group, hd), q.dtype, shared=True, name=f"q{b}_{g}")
            k.dma(q_src[b, g], rows, queue=first_q)
        else:
            q_src[b, g] = rows
        if b not in mask_src:
            mask_src[b] = mask[b : b + 1, :]
            if stage_mask:
                mask_src[b] = k.alloc((1, length), mask.dtype, shared=True, name=f"mask{b}")
                k.dma(mask_src[b], mask[b : b + 1, :], queue=first_q)
    ctx = dict(q=q_src, mask=mask_src, kc=k_cache, vc=v_cache, out=out, scale=float(scale), group=group)
    combiners = {}

    def combiner(pc: Piece) -> _Combiner:
        if (pc.b, pc.g) not in combiners:
            rows = out[pc.b, pc.g * group : (pc.g + 1) * group, :]
            queue = plan.queues[pc.combiner][1]
            combiners[pc.b, pc.g] = _Combiner(k, pc.combiner, rows, group, hd, pc.count, plan.v_cols, queue)
        return combiners[pc.b, pc.g]

    programs = [_engine_program(k, e, plan, ctx, combiner) for e in range(len(plan.pieces))]
    interleave(programs)
    return out


def _engine_program(k, e, plan: DecodePlan, ctx, combiner):
    cfg = k.config
    kc, vc, group = ctx["kc"], ctx["vc"], ctx["group"]
    hd, s_len, hkv = kc.shape[3], kc.shape[2], kc.shape[1]
    loads, misc = plan.queues[e]
    k_ring = [k.alloc((hd, plan.chunk), kc.dtype, engine=e, name=f"kT{i}_e{e}") for i in range(plan.depth)]
    v_ring = [k.alloc((plan.chunk, hd), vc.dtype, engine=e, name=f"v{i}_e{e}") for i in range(plan.depth)]
    counter = {"k": 0, "v": 0, "load": 0}

    def load_queue():
        counter["load"] += 1
        return loads[counter["load"] % len(loads)]

    live = []  # buffers of the two latest pieces: a piece's space is reused two pieces later
    for pc in plan.pieces[e]:
        if len(live) == 2:
            for buf in live.pop(0).values():
                k.free(buf)
        n = pc.n
        bufs = dict(
            q=k.alloc((group, hd), kc.dtype, engine=e, name=f"q_e{e}"),
            mask=k.alloc((1, n), ctx["mask"][pc.b].dtype, engine=e, name=f"mask_e{e}"),
            s=k.alloc((group, n), "fp32", engine=e, name=f"s_e{e}"),
            p=k.alloc((group, n), vc.dtype, engine=e, name=f"p_e{e}"),
            nb=k.alloc((group, 1), "fp32", engine=e, name=f"nb_e{e}"),
        )
        comb = combiner(pc) if pc.count > 1 else None
        direct = comb is not None and comb.e == e  # the combiner's own pieces write in place
        if direct:
            m, lsum, o = comb.m[:, pc.p : pc.p + 1], comb.l[:, pc.p : pc.p + 1], comb.o[:, :, pc.p]
        else:
            for name, shape in (("m", (group, 1)), ("l", (group, 1)), ("o", (group, hd))):
                bufs[name] = k.alloc(shape, "fp32", engine=e, name=f"{name}_e{e}")
            m, lsum, o = bufs["m"], bufs["l"], bufs["o"]
        cols = max(1, cfg.vector_max_elements // group)
        col_tiles = list(tiles(n, cols))
        if len(col_tiles) > 1:
            bufs["mparts"] = k.alloc((group, len(col_tiles)), "fp32", engine=e, name=f"mp_e{e}")
            bufs["lparts"] = k.alloc((group, len(col_tiles)), "fp32", engine=e, name=f"lp_e{e}")
        if comb is None:
            bufs["stage"] = k.alloc((group, hd), ctx["out"].dtype, engine=e, name=f"out_e{e}")
        heads = slice(pc.g * group, (pc.g + 1) * group)
        k.dma(bufs["q"], ctx["q"][pc.b, pc.g], queue=misc)
        k.dma(bufs["mask"], ctx["mask"][pc.b][:, pc.l0 : pc.l0 + n], queue=misc)
        chunks = _chunks(n, plan.chunk, plan.tile)
        base = (pc.b * hkv + pc.g) * s_len + pc.l0  # first cache row of the piece

        # Scores, K^T slice by slice: s[:, c] = q @ K^T[:, c].
        s = bufs["s"]
        for c0, cl in chunks:
            kt = k_ring[counter["k"] % plan.depth]
            counter["k"] += 1
            for i, (h0, hl) in enumerate(tiles(hd, plan.k_rows)):
                src = kc.region((base + c0) * hd + h0, (hl, cl), (1, hd))  # transposing read
                k.dma(kt[h0 : h0 + hl, :cl], src, queue=load_queue())
                k.matmul(
                    s[:, c0 : c0 + cl], bufs["q"][:, h0 : h0 + hl], kt[h0 : h0 + hl, :cl], accumulate=i > 0
                )
            yield

        # Softmax over the piece, in fp32: s = scale * s + mask; P = exp(s - max); l = sum P.
        nb, pbuf = bufs["nb"], bufs["p"]
        for j, (c0, w) in enumerate(col_tiles):
            sc = s[:, c0 : c0 + w]
            k.activation("identity", sc, sc, scale=ctx["scale"], bias=bufs["mask"][:, c0 : c0 + w])
            k.reduce("max", bufs["mparts"][:, j : j + 1] if len(col_tiles) > 1 else m, sc)
        if len(col_tiles) > 1:
            k.reduce("max", m, bufs["mparts"])
        k.vector("max", m, m, NEG)
        k.vector("neg", nb, m)
        for j, (c0, w) in enumerate(col_tiles):
            k.activation("exp", pbuf[:, c0 : c0 + w], s[:, c0 : c0 + w], bias=nb)
            k.reduce(
                "sum", bufs["lparts"][:, j : j + 1] if len(col_tiles) > 1 else lsum, pbuf[:, c0 : c0 + w]
            )
        if len(col_tiles) > 1:
            k.reduce("sum", lsum, bufs["lparts"])
        if comb is None:
            k.activation("reciprocal", lsum, lsum)
        else:
            if not direct:
                k.dma(comb.m[:, pc.p : pc.p + 1], m, queue=misc)
                k.dma(comb.l[:, pc.p : pc.p + 1], lsum, queue=misc)
            comb.sent_ml()

        # o += P[:, c] @ V[c]; the last chunk in MAC-column slices, each finished at once.
        out_rows = ctx["out"][pc.b, heads, :]
        for ci, (c0, cl) in enumerate(chunks):
            vt = v_ring[counter["v"] % plan.depth]
            counter["v"] += 1
            last = ci == len(chunks) - 1
            for h0, hl in tiles(hd, plan.v_cols):
                h = slice(h0, h0 + hl)
                k.dma(vt[:cl, h], vc[pc.b, pc.g, pc.l0 + c0 : pc.l0 + c0 + cl, h], queue=load_queue())
                k.matmul(o[:, h], pbuf[:, c0 : c0 + cl], vt[:cl, h], accumulate=ci > 0)
                if not last:
                    continue
                if comb is None:
                    k.vector("mul", bufs["stage"][:, h], o[:, h], lsum)  # o / l, cast
                    k.dma(out_rows[:, h], bufs["stage"][:, h], queue=misc)
                else:
                    if not direct:
                        k.dma(comb.o[:, h, pc.p], o[:, h], queue=misc)
                    comb.sent_o(h0, hl)
            yield
        live.append(bufs)


attention_decode = Kernel(
    "attention_decode", attention_decode_emit, attention_decode_fast, attention_decode_reference
)

__all__ = [
    "attention_decode",
    "attention_decode_emit",
    "attention_decode_fast",
    "attention_decode_reference",
    "decode_kv_tile",
    "decode_plan",
    "DecodePlan",
    "Piece",
    "NEG",
]
