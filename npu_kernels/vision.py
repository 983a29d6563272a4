"""SigLIP patch embedding and the Gemma3 multimodal projector.

patch_embed, as Hugging Face's SiglipVisionEmbeddings computes it (Conv2d with kernel = stride =
patch, ``flatten(2).transpose(1, 2)``, plus the position embedding)::

    out[n] = im2col(pixels)[n] @ w + b + pos[n],   n = i * (W // p) + j   (row-major grid)
    im2col(pixels)[n, (c, ky, kx)] = pixels[c, i * p + ky, j * p + kx]

IO (DRAM): pixels (C, H, W) one normalised image; w (C*p*p, D), the Conv2d weight (D, C, p, p)
flattened in (c, ky, kx) order and transposed (device layout, K rows); b (D,); pos (N, D) with
N = (H // p) * (W // p) (a remainder of H or W past the last whole patch is ignored, as the
convolution does); out (N, D) in pixels' dtype. Compile-time constants: patch.
Plan (``choose_patch_tiling`` schedules the candidates that fit, trace only, and keeps the
fastest): an engine grid ``gm x gn`` over (patches, D) blocks. The DMA engines gather im2col
rows straight from the image with strided 3-D descriptors, one per channel and grid-row
segment: (ky, j, kx) with strides (W, p, 1) into (p, K, 1). Three ways to hold the operands:

* ``resident_a`` (the usual one): the engine's whole im2col block stays in local SRAM, loaded
  m-tile by m-tile during the first column tile; loops run n-outer, and w streams through two
  (K, tn) column tiles, each used by every m-tile (the next one loads during the current one);
* ``resident_w``: m-outer, im2col m-tiles double-buffered, the engine's w columns resident;
* ``stream``: m-outer, im2col m-tiles and (tk, tn) w tiles both double-buffered.

w is staged once into shared SRAM (tile by tile, each split over all queues) when several
engines read it. Contraction tiles grow from one MAC-array height (64, 128, 256, rest), so the
first matmul waits only for a small piece of w, with no extra passes. The epilogue on the
vector unit adds the position rows (streamed one step ahead from DRAM) and the bias in fp32
and casts; stores go out as each (tm, tn) tile finishes.
SRAM per engine (resident_a): the (N / gm, K) im2col block, 2 x (K, tn) w tiles, 2 fp32
accumulators, 2 position and 2 output tiles of (tm, tn), the bias row; shared: w.
FLOPs: 2 * N * K * D. Compulsory DRAM bytes: (C*H*W + K*D + D + 2 * N * D) * elt. (With K =
588 the matrix unit makes ceil(588 / 64) = 10 passes per 9.2 passes of work: at most 91.9% of
peak.)

mm_projector, as Hugging Face's Gemma3MultiModalProjector computes it::

    tokens = AvgPool2d(pool)(x.T.reshape(Dv, g, g)).flatten(1).T     # (T, Dv), T = (g/pool)^2
    out = rmsnorm_gemma(tokens, norm_w, eps) @ w                       # (T, Dt)

IO (DRAM): x (N, Dv) the vision tower's output for one image, N = g * g patches in row-major
grid order, g a multiple of pool; norm_w (Dv,); w (Dv, Dt) (device layout of the projection
weight); out (T, Dt) in x's dtype. Compile-time constants: pool, eps.
Plan: the contraction (Dv) is the outer loop, in k-tiles of ``tk`` columns, so compute starts
after one k-tile of x and w instead of after all of x:

* pooling: every engine takes a share of the token grid rows; per k-tile it loads the
  (pool * g rows, tk) slab of x under its tokens, sums each pool x pool window on the vector
  unit (strided 3-D views: first over the window's rows, then over its columns) and writes the
  window sums S (not yet divided) to shared SRAM;
* the RMSNorm is linear within a row except for its scale, so it is split: each matrix engine
  copies the k-tile of S for all tokens, multiplies by (1 + norm_w) into the bf16 operand,
  and accumulates sum(S^2) per token; since mean(avg^2) = mean(S^2) / pool^4,
  rsqrt(mean(avg^2) + eps) * avg = rsqrt(sum(S^2) / Dv + eps * pool^4) * S, and that per-token
  scale multiplies the fp32 accumulator in the epilogue;
* the product: engine j owns a block of Dt columns (all engines), keeps its (T, Dt / E) fp32
  accumulator resident and streams its w columns in (tk, Dt / E) tiles; after the last
  k-tile each output tile is scaled, cast and stored as soon as it is done.

Order per k-tile step s: pool s and write S; each matrix engine reads S and builds its
operand; then the x slab and w tile of step s + ``ahead`` are issued (behind the S exchange on
the queues, so the exchange never waits for a bulk transfer; ``ahead`` 2 keeps DRAM busy when
memory bound, 1 lets the exchange go sooner when compute bound); then the matmuls of step s.
The last ``tail`` k-tiles of a block run n-outer in column tiles of ``tn_tail``, so the output
stores overlap the last products instead of all following them. ``choose_projector_tiling``
schedules (ahead, tail, tn_tail) candidates (trace only) and keeps the fastest.
If the accumulator does not fit, the tokens go in blocks of whole token-grid rows (w is then
read once per block). SRAM per engine: 3 x-slab tiles and fp32 window-sum scratch (pooling),
2 S and tail + 1 operand tiles (T, tk), tail + 2 w tiles (tk, Dt / E), the (T, Dt / E) fp32
accumulator, 2 output tiles; shared: S (T, Dv). FLOPs: 2 * T * Dv * Dt on the matrix unit (the
pooling adds N * Dv on the vector unit). Compulsory DRAM bytes: (N * Dv + Dv + Dv * Dt +
T * Dt) * elt.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from npu_emulator import Kernel, KernelError, as_stored
from npu_emulator.memory import itemsize
from npu_emulator.program import ceil_div, tiles

from .common import fastest, interleave, split, trace_cycles


def _queues(cfg, engine: int) -> list[int]:
    """The DMA queues engine ``engine`` owns when every engine streams at once."""
    per = max(1, cfg.dma_queues // cfg.num_engines)
    return [(engine * per + i) % cfg.dma_queues for i in range(per)]


def _row_chunks(rows: int, cols: int, vmax: int):
    """Row tiles of a (rows, cols) operand that fit one vector instruction."""
    if cols > vmax:
        raise KernelError(f"rows of {cols} elements exceed the vector unit's {vmax} per instruction")
    return tiles(rows, max(1, vmax // cols))


def _balanced(total: int, limit: int, unit: int) -> int:
    """The smallest multiple of ``unit`` covering ``total`` in as few tiles as ``limit`` allows."""
    count = ceil_div(total, limit)
    return min(limit, ceil_div(ceil_div(total, count), unit) * unit)


# =============================================================================== patch_embed


def patch_embed_reference(pixels, w, b, pos, *, patch: int) -> np.ndarray:
    """The convolution as written: each patch dotted with each output channel's kernel."""
    c, h, wd = pixels.shape
    p = patch
    gh, gw = h // p, wd // p
    d = w.shape[1]
    kernel = w.astype(np.float64).T.reshape(d, c, p, p)  # Conv2d weight (D, C, p, p)
    out = np.empty((gh * gw, d))
    for i in range(gh):
        for j in range(gw):
            window = pixels[:, i * p : (i + 1) * p, j * p : (j + 1) * p].astype(np.float64)
            out[i * gw + j] = np.einsum("cyx,dcyx->d", window, kernel) + b + pos[i * gw + j]
    return out


def im2col(pixels: np.ndarray, patch: int) -> np.ndarray:
    """(C, H, W) -> (N, C*p*p): one row per patch in row-major grid order, (c, ky, kx) columns."""
    c, h, wd = pixels.shape
    p = patch
    gh, gw = h // p, wd // p
    x = pixels[:, : gh * p, : gw * p].reshape(c, gh, p, gw, p)
    return x.transpose(1, 3, 0, 2, 4).reshape(gh * gw, c * p * p)


def patch_embed_fast(pixels, w, b, pos, *, patch: int) -> np.ndarray:
    a = np.ascontiguousarray(im2col(np.asarray(pixels, np.float32), patch))
    out = np.matmul(a, np.asarray(w, np.float32))
    out += np.asarray(b, np.float32)
    out += np.asarray(pos, np.float32)
    return out


@dataclass(frozen=True)
class PatchTiling:
    gm: int  # engine grid rows (blocks of patches)
    gn: int  # engine grid columns (blocks of D)
    tm: int  # patches per m-tile (one matmul's rows)
    tn: int  # output columns per tile
    k_tiles: tuple  # (start, length) contraction tiles, growing from one MAC-array height so
    # that the first matmul waits for a small piece of w (see _growing_tiles)
    stage_w: bool  # w staged once into shared SRAM (gm > 1 engines read it)
    # "resident_a": the engine's whole im2col block stays in local SRAM, loops run n-outer and
    # w streams through two (K, tn) column tiles, each used by every m-tile;
    # "resident_w": m-outer, im2col tiles double-buffered, the engine's w columns resident;
    # "stream": m-outer, im2col tiles and (tk, tn) w tiles both double-buffered.
    mode: str = "resident_a"

    def blocks(self, cfg, n: int, d: int) -> tuple[int, int]:
        mp = ceil_div(n, self.gm)
        np_ = min(d, ceil_div(ceil_div(d, cfg.mac_cols), self.gn) * cfg.mac_cols)
        return mp, np_


PATCH_MODES = ("resident_a", "resident_w", "stream")


def _patch_sram(cfg, t: PatchTiling, n, kk, d, esz) -> int:
    mp, np_ = t.blocks(cfg, n, d)
    tm, tn = min(t.tm, mp), min(t.tn, np_)
    if t.mode == "resident_a":
        a_bytes, w_bytes = mp * kk * esz, 2 * kk * tn * esz
    elif t.mode == "resident_w":
        a_bytes, w_bytes = 2 * tm * kk * esz, kk * np_ * esz
    else:
        a_bytes, w_bytes = 2 * tm * kk * esz, 2 * max(kl for _, kl in t.k_tiles) * tn * esz
    slack = cfg.sram_alignment * 16  # rounding of the dozen buffers
    return a_bytes + w_bytes + 2 * tm * tn * (4 + 2 * esz) + np_ * esz + slack


@functools.lru_cache(maxsize=256)
def choose_patch_tiling(cfg, c: int, h: int, wd: int, patch: int, d: int, dtype: str = "bf16") -> PatchTiling:
    """Engine grid from the shape; tiles and mode by scheduling the candidates that fit
    (trace only, no values)."""
    p = patch
    n, kk = (h // p) * (wd // p), c * p * p
    esz = itemsize(dtype)
    gm = max(1, min(cfg.num_engines, ceil_div(n, cfg.mac_rows)))
    gn = max(1, min(cfg.num_engines // gm, ceil_div(d, cfg.mac_cols)))
    mp, np_ = PatchTiling(gm, gn, 1, 1, (), False).blocks(cfg, n, d)
    k_tiles = _growing_tiles(kk, cfg.mac_rows, cfg.matmul_max_k)
    stage = gm > 1 and kk * d * esz <= cfg.shared_sram_bytes
    top_m, top_n = min(mp, cfg.matmul_max_m), min(np_, cfg.matmul_max_n)
    tms = {top_m} | {s for s in (cfg.mac_rows, 2 * cfg.mac_rows) if s < top_m}
    tns = {_balanced(np_, s, cfg.mac_cols) for s in {top_n} | {s for s in (128, 256) if s < top_n}}
    cands = []
    for mode in PATCH_MODES:  # in order of preference: the first that fits, per (tm, tn)
        for tm in sorted(tms):
            for tn in sorted(tns):
                t = PatchTiling(gm, gn, tm, tn, k_tiles, stage, mode)
                if _patch_sram(cfg, t, n, kk, d, esz) <= cfg.local_sram_bytes and not any(
                    (c_.tm, c_.tn) == (tm, tn) for c_ in cands
                ):
                    cands.append(t)
    if not cands:
        raise KernelError(
            f"patch_embed: no tiling of (N, K, D) = ({n}, {kk}, {d}) fits {cfg.local_sram_bytes} B of local SRAM"
        )
    if len(cands) == 1:
        return cands[0]
    inputs = [
        ("pixels", (c, h, wd), dtype),
        ("w", (kk, d), dtype),
        ("b", (d,), dtype),
        ("pos", (n, d), dtype),
    ]
    return fastest(
        cands, lambda t: trace_cycles(cfg, "patch_embed", _emit_patch_embed, inputs, patch, t, dtype=dtype)
    )


def patch_embed_emit(k, pixels, w, b, pos, *, patch: int, tiling: PatchTiling | None = None):
    p = int(patch)
    if len(pixels.shape) != 3:
        raise KernelError(f"patch_embed: pixels must be (C, H, W), got {pixels.shape}")
    c, h, wd = pixels.shape
    if p < 1 or h < p or wd < p:
        raise KernelError(f"patch_embed: patch {p} does not fit an image of {h} x {wd}")
    n, kk = (h // p) * (wd // p), c * p * p
    if len(w.shape) != 2 or w.shape[0] != kk:
        raise KernelError(f"patch_embed: w {w.shape} must be (C*p*p = {kk}, D)")
    d = w.shape[1]
    if b.shape != (d,) or pos.shape != (n, d):
        raise KernelError(f"patch_embed: b {b.shape} must be ({d},) and pos {pos.shape} ({n}, {d})")
    if pixels.dtype != w.dtype:
        raise KernelError(f"patch_embed: pixels are {pixels.dtype} and w is {w.dtype}")
    t = tiling or choose_patch_tiling(k.config, c, h, wd, p, d, pixels.dtype)
    return _emit_patch_embed(k, pixels, w, b, pos, p, t)


def _growing_tiles(total: int, unit: int, limit: int) -> tuple:
    """(start, length) tiles of ``total``: unit, 2 unit, 4 unit, ... up to ``limit``, the rest
    balanced. Every tile but the last is a multiple of ``unit``, so the matrix unit makes no
    more passes than with the fewest tiles."""
    out, start, size = [], 0, unit
    while total - start > size and size < limit:
        out.append((start, size))
        start += size
        size = min(2 * size, limit)
    rest = total - start
    out += [(start + s, sl) for s, sl in tiles(rest, _balanced(rest, limit, unit))]
    return tuple(out)


class _TileStager:
    """Copies (row band, column block) tiles of a DRAM operand into shared SRAM on first
    request, each split by rows over every DMA queue so that it lands early."""

    def __init__(self, k, src, name: str):
        self.k, self.src = k, src
        self.dst = k.alloc(src.shape, src.dtype, shared=True, name=name)
        self.done: set = set()
        self.next_queue = 0

    def ensure(self, r0: int, rl: int, c0: int, cl: int) -> None:
        if (r0, c0) in self.done:
            return
        self.done.add((r0, c0))
        k, nq = self.k, self.k.config.dma_queues
        for p0, pl in tiles(rl, ceil_div(rl, nq)):
            region = (slice(r0 + p0, r0 + p0 + pl), slice(c0, c0 + cl))
            k.dma(self.dst[region], self.src[region], queue=self.next_queue)
            self.next_queue = (self.next_queue + 1) % nq


def _im2col_dma(k, dst, pixels, p: int, n0: int, nl: int, queue: int) -> None:
    """Gather patches n0 .. n0+nl-1 into dst rows 0 .. nl-1 (dst a (rows, K) view)."""
    c, h, wd = pixels.shape
    gw = wd // p
    kk = dst.shape[1]
    for i in range(n0 // gw, (n0 + nl - 1) // gw + 1):
        j0 = max(n0, i * gw) - i * gw
        j1 = min(n0 + nl, (i + 1) * gw) - i * gw
        row = i * gw + j0 - n0  # first dst row of this grid-row segment
        src0 = i * p * wd + j0 * p
        if p == 1:  # (c, j) in one descriptor
            k.dma(
                dst.region(row * kk, (c, j1 - j0), (1, kk)),
                pixels.region(src0, (c, j1 - j0), (h * wd, 1)),
                queue=queue,
            )
            continue
        for ch in range(c):  # (ky, j, kx) of one channel: strides (W, p, 1) -> (p, K, 1)
            k.dma(
                dst.region(row * kk + ch * p * p, (p, j1 - j0, p), (p, kk, 1)),
                pixels.region(ch * h * wd + src0, (p, j1 - j0, p), (wd, p, 1)),
                queue=queue,
            )


def _emit_patch_embed(k, pixels, w, b, pos, p: int, t: PatchTiling):
    cfg = k.config
    kk, d = w.shape
    n = pos.shape[0]
    out = k.output((n, d), pixels.dtype, name="out")
    mp, np_ = t.blocks(cfg, n, d)
    stager = _TileStager(k, w, "w_shared") if t.stage_w else None
    programs = []
    engine = 0
    for gi in range(t.gm):
        for gj in range(t.gn):
            m0, m1 = gi * mp, min(n, (gi + 1) * mp)
            c0, c1 = gj * np_, min(d, (gj + 1) * np_)
            if m0 < m1 and c0 < c1:
                programs.append(
                    _patch_engine(k, engine, pixels, w, b, pos, out, p, (m0, m1), (c0, c1), t, stager)
                )
            engine += 1
    interleave(programs)
    return out


def _patch_engine(k, e, pixels, w, b, pos, out, p, mr, cr, t: PatchTiling, stager):
    cfg = k.config
    (m0, m1), (c0, c1) = mr, cr
    kk = w.shape[0]
    qs = _queues(cfg, e)
    q_in, q_w, q_out = qs[0], qs[1 % len(qs)], qs[2 % len(qs)]
    rows, cols = m1 - m0, c1 - c0
    tm, tn = min(t.tm, rows), min(t.tn, cols)
    m_tiles, n_tiles, k_tiles = list(tiles(rows, tm)), list(tiles(cols, tn)), list(t.k_tiles)
    tk = max(kl for _, kl in k_tiles)
    w_src = stager.dst if stager else w
    if t.mode == "resident_a":
        a_all = k.alloc((rows, kk), pixels.dtype, engine=e, name=f"im2col_e{e}")
        w_slots = [k.alloc((kk, tn), w.dtype, engine=e, name=f"w{s}_e{e}") for s in range(2)]
        steps = [(mi, ni) for ni in range(len(n_tiles)) for mi in range(len(m_tiles))]
    else:
        a_slots = [k.alloc((tm, kk), pixels.dtype, engine=e, name=f"im2col{s}_e{e}") for s in range(2)]
        if t.mode == "resident_w":
            w_loc = k.alloc((kk, cols), w.dtype, engine=e, name=f"w_e{e}")
        else:
            w_slots = [k.alloc((tk, tn), w.dtype, engine=e, name=f"w{s}_e{e}") for s in range(2)]
        steps = [(mi, ni) for mi in range(len(m_tiles)) for ni in range(len(n_tiles))]
    accs = [k.alloc((tm, tn), "fp32", engine=e, name=f"acc{s}_e{e}") for s in range(2)]
    pos_t = [k.alloc((tm, tn), pos.dtype, engine=e, name=f"pos{s}_e{e}") for s in range(2)]
    outs = [k.alloc((tm, tn), out.dtype, engine=e, name=f"o{s}_e{e}") for s in range(2)]
    b_row = k.alloc((1, cols), b.dtype, engine=e, name=f"b_e{e}")

    def a_tile(mi):
        r0, rl = m_tiles[mi]
        return a_all[r0 : r0 + rl] if t.mode == "resident_a" else a_slots[mi % 2][:rl]

    def load_w(ni, parts=slice(None), spread=False):
        """w columns of n-tile ni into slot ni % 2 (resident_a), k-tile by k-tile; ``spread``
        puts the k-tiles on all the engine's queues in turn (the first n-tile: nothing to hide
        its load behind)."""
        n0, nl = n_tiles[ni]
        for j, (k0, kl) in enumerate(k_tiles[parts]):
            if stager:
                stager.ensure(k0, kl, c0 + n0, nl)
            q = qs[(1 + j) % len(qs)] if spread else q_w
            k.dma(w_slots[ni % 2][k0 : k0 + kl, :nl], w_src[k0 : k0 + kl, c0 + n0 : c0 + n0 + nl], queue=q)

    def loads(i):
        """What step i reads that is not in local SRAM yet; issued one step ahead."""
        mi, ni = steps[i]
        (r0, rl), (n0, nl) = m_tiles[mi], n_tiles[ni]
        if t.mode == "resident_a" and ni == 0 or t.mode != "resident_a" and (i == 0 or steps[i - 1][0] != mi):
            _im2col_dma(k, a_tile(mi), pixels, p, m0 + r0, rl, q_in)
        k.dma(pos_t[i % 2][:rl, :nl], pos[m0 + r0 : m0 + r0 + rl, c0 + n0 : c0 + n0 + nl], queue=q_in)

    # Prologue: what the first matmul needs (on every engine) goes first on the queues.
    if t.mode == "resident_a":
        load_w(0, slice(0, 1))
    loads(0)
    k.dma(b_row, b.region(c0, (1, cols), (cols, 1)), queue=q_w)
    yield
    if t.mode == "resident_a":
        load_w(0, slice(1, None), spread=True)
    yield
    w_loaded: set = set()
    for i, (mi, ni) in enumerate(steps):
        (r0, rl), (n0, nl) = m_tiles[mi], n_tiles[ni]
        if t.mode == "resident_a" and mi == 0 and ni + 1 < len(n_tiles):
            load_w(ni + 1)  # the slot's previous tile (ni - 1) is no longer read after this
        if i + 1 < len(steps):
            loads(i + 1)
        acc, pt, o = accs[i % 2], pos_t[i % 2], outs[i % 2]
        a = a_tile(mi)
        for ki, (k0, kl) in enumerate(k_tiles):
            cols_w = slice(c0 + n0, c0 + n0 + nl)
            if t.mode == "resident_a":
                wt = w_slots[ni % 2][k0 : k0 + kl, :nl]
            else:
                if stager:
                    stager.ensure(k0, kl, c0 + n0, nl)
                if t.mode == "resident_w":
                    wt = w_loc[k0 : k0 + kl, n0 : n0 + nl]
                    if (k0, n0) not in w_loaded:
                        k.dma(wt, w_src[k0 : k0 + kl, cols_w], queue=q_w)
                        w_loaded.add((k0, n0))
                else:
                    wt = w_slots[(i * len(k_tiles) + ki) % 2][:kl, :nl]
                    k.dma(wt, w_src[k0 : k0 + kl, cols_w], queue=q_w)
            k.matmul(acc[:rl, :nl], a[:, k0 : k0 + kl], wt, accumulate=ki > 0)
            yield
        # Epilogue: + position rows, + bias, in fp32; the second add casts to the output dtype.
        for s0, sl in _row_chunks(rl, nl, cfg.vector_max_elements):
            k.vector("add", acc[s0 : s0 + sl, :nl], acc[s0 : s0 + sl, :nl], pt[s0 : s0 + sl, :nl])
            k.vector("add", o[s0 : s0 + sl, :nl], acc[s0 : s0 + sl, :nl], b_row[:, n0 : n0 + nl])
        k.dma(out[m0 + r0 : m0 + r0 + rl, c0 + n0 : c0 + n0 + nl], o[:rl, :nl], queue=q_out)


patch_embed = Kernel("patch_embed", patch_embed_emit, patch_embed_fast, patch_embed_reference)


# ============================================================================== mm_projector


def mm_projector_reference(x, norm_w, w, *, pool: int, eps: float = 1e-6) -> np.ndarray:
    """Gemma3MultiModalProjector as written: grid, average pool, Gemma RMSNorm, projection."""
    n, dv = x.shape
    g = math.isqrt(n)
    gp = g // pool
    grid = x.astype(np.float64).T.reshape(dv, g, g)  # (Dv, rows, cols) of the patch grid
    pooled = np.empty((dv, gp, gp))
    for i in range(gp):
        for j in range(gp):
            pooled[:, i, j] = grid[:, i * pool : (i + 1) * pool, j * pool : (j + 1) * pool].mean(axis=(1, 2))
    tokens = pooled.reshape(dv, gp * gp).T
    normed = tokens / np.sqrt(np.mean(tokens**2, axis=-1, keepdims=True) + eps)
    normed = normed * (1.0 + norm_w.astype(np.float64))
    return normed @ w.astype(np.float64)


def mm_projector_fast(x, norm_w, w, *, pool: int, eps: float = 1e-6, numerics: str = "fp32") -> np.ndarray:
    """The tiled program's split RMSNorm on whole arrays: the window sums S and the operand
    S * (1 + norm_w) pass through bf16 tiles (rounded as the device does under ``numerics``),
    the per-token scale rsqrt(sum(S^2) / Dv + eps * pool^4) multiplies the fp32 product."""
    n, dv = x.shape
    g = math.isqrt(n)
    gp = g // pool
    grid = np.asarray(x, np.float32).reshape(gp, pool, gp, pool, dv)
    sums = as_stored(grid.sum(axis=(1, 3), dtype=np.float32).reshape(gp * gp, dv), numerics)
    operand = as_stored(sums * (np.float32(1.0) + np.asarray(norm_w, np.float32)), numerics)
    scale = 1.0 / np.sqrt(np.einsum("td,td->t", sums, sums) / np.float32(dv) + np.float32(eps * pool**4))
    return np.matmul(operand, np.asarray(w, np.float32)) * scale.astype(np.float32)[:, None]


@dataclass(frozen=True)
class ProjectorTiling:
    tk: int  # contraction (Dv) tile: the pipeline step
    cw: int  # output columns per engine
    rb: int  # token-grid rows per token block
    tn: int  # output columns per matmul in the k-outer steps
    tail: int = 2  # last k-tiles of a block run n-outer, so that output stores overlap compute
    tn_tail: int = 128  # output columns per matmul / epilogue tile in those last k-tiles
    ahead: int = 2  # steps the x slab and w tile loads run ahead: 2 keeps DRAM busy (memory
    # bound), 1 lets each step's S exchange go sooner (compute bound)


def _projector_sram(cfg, g, pool, dv, t: ProjectorTiling, esz) -> int:
    gp = g // pool
    tb = t.rb * gp
    prow = ceil_div(t.rb, cfg.num_engines)  # grid rows one engine pools
    tm, tn = min(tb, cfg.matmul_max_m), min(max(t.tn, t.tn_tail), t.cw)
    pooling = 0
    if pool > 1:
        pooling = 3 * prow * pool * g * t.tk * esz + prow * g * t.tk * 4 + prow * gp * t.tk * (4 + 2 * esz)
    matmul = (2 + t.tail + 1) * tb * t.tk * esz + tb * t.tk * 4 + (t.tail + 2) * t.tk * t.cw * esz
    matmul += tb * t.cw * 4 + 2 * tm * tn * esz + 3 * tb * 4 + dv * (4 + esz)
    return pooling + matmul + cfg.sram_alignment * 48


@functools.lru_cache(maxsize=256)
def choose_projector_tiling(cfg, g: int, pool: int, dv: int, dt: int, dtype: str = "bf16") -> ProjectorTiling:
    """Tiles from the shape and SRAM; the tail (how many last k-tiles run n-outer, and their
    column tile) by scheduling a few candidates (trace only, no values)."""
    esz = itemsize(dtype)
    gp = g // pool
    vmax = cfg.vector_max_elements
    if g > vmax:
        raise KernelError(f"mm_projector: a grid row of {g} patches exceeds {vmax} vector elements")
    tk = min(dv, cfg.mac_rows, cfg.matmul_max_k, max(1, vmax // g))
    cw = min(dt, ceil_div(ceil_div(dt, cfg.mac_cols), cfg.num_engines) * cfg.mac_cols)
    tn = _balanced(cw, cfg.matmul_max_n, cfg.mac_cols)
    n_k = ceil_div(dv, tk)
    cands = []
    tn_tails = sorted({_balanced(cw, s, cfg.mac_cols) for s in (2 * cfg.mac_cols, 4 * cfg.mac_cols)})
    for ahead in (1, 2):
        for tail in sorted({min(n_k, L) for L in (1, 2, 3)}):
            for tn_tail in tn_tails:
                for rb in range(gp, 0, -1):
                    t = ProjectorTiling(tk, cw, rb, tn, tail, tn_tail, ahead)
                    if _projector_sram(cfg, g, pool, dv, t, esz) <= cfg.local_sram_bytes and (
                        rb * gp * dv * esz <= cfg.shared_sram_bytes
                    ):
                        cands.append(t)
                        break
    if not cands:
        raise KernelError(
            f"mm_projector: one token-grid row of (g={g}, pool={pool}, Dv={dv}, Dt={dt}) does not fit "
            f"{cfg.local_sram_bytes} B of local SRAM"
        )
    if len(cands) == 1:
        return cands[0]
    inputs = [("x", (g * g, dv), dtype), ("norm_w", (dv,), dtype), ("w", (dv, dt), dtype)]
    return fastest(
        cands,
        lambda t: trace_cycles(cfg, "mm_projector", _emit_projector, inputs, g, pool, 1e-6, t, dtype=dtype),
    )


def mm_projector_emit(
    k, x, norm_w, w, *, pool: int, eps: float = 1e-6, tiling: ProjectorTiling | None = None
):
    cfg = k.config
    pool = int(pool)
    if len(x.shape) != 2:
        raise KernelError(f"mm_projector: x must be (N, Dv), got {x.shape}")
    n, dv = x.shape
    g = math.isqrt(n)
    if g * g != n or pool < 1 or g % pool:
        raise KernelError(f"mm_projector: N = {n} must be g * g with g a multiple of pool = {pool}")
    if norm_w.shape != (dv,) or len(w.shape) != 2 or w.shape[0] != dv:
        raise KernelError(f"mm_projector: norm_w {norm_w.shape} must be ({dv},) and w {w.shape} ({dv}, Dt)")
    if x.dtype != w.dtype:
        raise KernelError(f"mm_projector: x is {x.dtype} and w is {w.dtype}")
    dt = w.shape[1]
    t = tiling or choose_projector_tiling(cfg, g, pool, dv, dt, x.dtype)
    return _emit_projector(k, x, norm_w, w, g, pool, float(eps), t)


def _emit_projector(k, x, norm_w, w, g, pool, eps, t: ProjectorTiling):
    cfg = k.config
    vmax = cfg.vector_max_elements
    dv, dt = w.shape
    gp = g // pool
    out = k.output((gp * gp, dt), x.dtype, name="out")
    tk, rb = t.tk, t.rb
    tb_max = rb * gp
    k_tiles = list(tiles(dv, tk))
    n_k = len(k_tiles)
    tail = max(1, min(t.tail, n_k))
    col_blocks = list(tiles(dt, t.cw))
    blocks = list(tiles(gp, rb))  # token blocks, in token-grid rows
    engines = list(k.engines)
    prow = ceil_div(rb, len(engines))
    qs = [_queues(cfg, e) for e in engines]
    role = [[q[r % len(q)] for r in range(4)] for q in qs]  # x in, w in, S out, S in
    n_at, n_w = tail + 1, tail + 2  # operand and w slots: a tail's k-tiles are all live at once

    s_sh = k.alloc((tb_max, dv), x.dtype, shared=True, name="S_shared")
    # Pooling buffers (every engine pools a share of the token-grid rows).
    pl = {}
    if pool > 1:
        for e in engines:
            pl[e] = dict(
                x=[k.alloc((prow * pool * g, tk), x.dtype, engine=e, name=f"x{s}_e{e}") for s in range(3)],
                y=k.alloc((prow * g, tk), "fp32", engine=e, name=f"colsum_e{e}"),
                z=k.alloc((prow * gp, tk), "fp32", engine=e, name=f"winsum_e{e}") if pool > 2 else None,
                s=[k.alloc((prow * gp, tk), x.dtype, engine=e, name=f"S{s}_e{e}") for s in range(2)],
            )
    # Matrix-engine buffers: engine j owns the columns col_blocks[j].
    tm = min(tb_max, cfg.matmul_max_m)
    mm = []
    for j, (c0, cl) in enumerate(col_blocks):
        e = engines[j]
        tn, tn_tail = min(t.tn, cl), min(t.tn_tail, cl)
        nw = k.alloc((1, dv), norm_w.dtype, engine=e, name=f"norm_w_e{e}")
        k.dma(nw, norm_w.region(0, (1, dv), (dv, 1)), queue=role[e][3])
        w1 = k.alloc((1, dv), "fp32", engine=e, name=f"w1_e{e}")
        k.vector("add", w1, nw, 1.0)  # Gemma scales by (1 + w)
        mm.append(
            dict(
                e=e,
                c0=c0,
                cl=cl,
                tn=tn,
                tn_tail=tn_tail,
                w1=w1,
                st=[k.alloc((tb_max, tk), x.dtype, engine=e, name=f"s{s}_e{e}") for s in range(2)],
                at=[k.alloc((tb_max, tk), w.dtype, engine=e, name=f"a{s}_e{e}") for s in range(n_at)],
                sq=k.alloc((tb_max, tk), "fp32", engine=e, name=f"sq_e{e}"),
                part=k.alloc((tb_max, 1), "fp32", engine=e, name=f"part_e{e}"),
                ss=k.alloc((tb_max, 1), "fp32", engine=e, name=f"ss_e{e}"),
                r=k.alloc((tb_max, 1), "fp32", engine=e, name=f"r_e{e}"),
                wt=[k.alloc((tk, cl), w.dtype, engine=e, name=f"w{s}_e{e}") for s in range(n_w)],
                acc=k.alloc((tb_max, cl), "fp32", engine=e, name=f"acc_e{e}"),
                o=[k.alloc((tm, tn_tail), out.dtype, engine=e, name=f"o{s}_e{e}") for s in range(2)],
                stores=0,
            )
        )

    steps = [(bi, ki) for bi in range(len(blocks)) for ki in range(n_k)]

    def shares(bi):
        """(engine, first grid row, grid rows) of the pooling shares of token block bi."""
        b0, bl = blocks[bi]
        return [(engines[i], b0 + r0, rl) for i, (r0, rl) in enumerate(split(bl, len(engines)))]

    def x_load(s):
        if pool == 1:
            return
        bi, ki = steps[s]
        k0, kl = k_tiles[ki]
        for e, r0, rl in shares(bi):
            xt = pl[e]["x"][s % 3]
            k.dma(
                xt[: rl * pool * g, :kl],
                x[r0 * pool * g : (r0 + rl) * pool * g, k0 : k0 + kl],
                queue=role[e][0],
            )

    def w_load(s):
        bi, ki = steps[s]
        k0, kl = k_tiles[ki]
        for m in mm:
            k.dma(
                m["wt"][s % n_w][:kl, :], w[k0 : k0 + kl, m["c0"] : m["c0"] + m["cl"]], queue=role[m["e"]][1]
            )

    def pool_step(s):
        """Window sums S of step s's k-tile, every engine its token-grid rows, into shared SRAM."""
        bi, ki = steps[s]
        k0, kl = k_tiles[ki]
        b0 = blocks[bi][0]
        for e, r0, rl in shares(bi):
            dst = s_sh[(r0 - b0) * gp : (r0 - b0 + rl) * gp, k0 : k0 + kl]
            if pool == 1:  # tokens are the patches: DRAM straight to shared SRAM
                k.dma(dst, x[r0 * g : (r0 + rl) * g, k0 : k0 + kl], queue=role[e][2])
                continue
            buf = pl[e]
            xt, y, z, st = buf["x"][s % 3], buf["y"], buf["z"], buf["s"][s % 2]
            for l0, ln in tiles(rl, max(1, vmax // (g * kl))):
                # The window's rows: y[l, c] = sum_a x[(l * pool + a) * g + c] ...
                ys = y.region(l0 * g * tk, (ln, g, kl), (g * tk, tk, 1))
                xa = [
                    xt.region((l0 * pool + a) * g * tk, (ln, g, kl), (pool * g * tk, tk, 1))
                    for a in range(pool)
                ]
                k.vector("add", ys, xa[0], xa[1])
                for a in range(2, pool):
                    k.vector("add", ys, ys, xa[a])
                # ... then its columns: S[l, j] = sum_b y[l, j * pool + b].
                yb = [
                    y.region((l0 * g + b_) * tk, (ln, gp, kl), (g * tk, pool * tk, 1)) for b_ in range(pool)
                ]
                sv = st.region(l0 * gp * tk, (ln, gp, kl), (gp * tk, tk, 1))
                if pool == 2:
                    k.vector("add", sv, yb[0], yb[1])
                else:
                    zv = z.region(l0 * gp * tk, (ln, gp, kl), (gp * tk, tk, 1))
                    k.vector("add", zv, yb[0], yb[1])
                    for b_ in range(2, pool - 1):
                        k.vector("add", zv, zv, yb[b_])
                    k.vector("add", sv, zv, yb[pool - 1])  # rounded once, to the device dtype
            k.dma(dst, st[: rl * gp, :kl], queue=role[e][2])

    def operand_step(s):
        """Each matrix engine: S of step s from shared SRAM, the bf16 operand S * (1 + norm_w),
        and the running sum of S^2 per token (then the per-token scale after the last k-tile)."""
        bi, ki = steps[s]
        k0, kl = k_tiles[ki]
        tb = blocks[bi][1] * gp
        for m in mm:
            st, at, sq = m["st"][s % 2], m["at"][s % n_at], m["sq"]
            ss, part = m["ss"], m["part"]
            k.dma(st[:tb, :kl], s_sh[:tb, k0 : k0 + kl], queue=role[m["e"]][3])
            chunks = list(_row_chunks(tb, kl, vmax))
            for r0, rl in chunks:  # the matmul operand first: it gates the matrix unit
                k.vector("mul", at[r0 : r0 + rl, :kl], st[r0 : r0 + rl, :kl], m["w1"][:, k0 : k0 + kl])
            for r0, rl in chunks:
                k.vector("square", sq[r0 : r0 + rl, :kl], st[r0 : r0 + rl, :kl])
                if ki == 0:
                    k.reduce("sum", ss[r0 : r0 + rl], sq[r0 : r0 + rl, :kl])
                else:
                    k.reduce("sum", part[r0 : r0 + rl], sq[r0 : r0 + rl, :kl])
                    k.vector("add", ss[r0 : r0 + rl], ss[r0 : r0 + rl], part[r0 : r0 + rl])
            if ki == n_k - 1:  # rsqrt(mean(avg^2) + eps) / pool^2 = rsqrt(mean(S^2) + eps pool^4)
                k.activation("rsqrt", m["r"][:tb], ss[:tb], scale=1.0 / dv, bias=eps * pool**4)

    def matmul_step(s):
        bi, ki = steps[s]
        tb = blocks[bi][1] * gp
        if ki < n_k - tail:  # k-outer: every column tile of this k-tile
            for m in mm:
                kl = k_tiles[ki][1]
                at, wt, acc = m["at"][s % n_at], m["wt"][s % n_w], m["acc"]
                for n0, nl in tiles(m["cl"], m["tn"]):
                    for r0, rl in tiles(tb, tm):
                        k.matmul(
                            acc[r0 : r0 + rl, n0 : n0 + nl],
                            at[r0 : r0 + rl, :kl],
                            wt[:kl, n0 : n0 + nl],
                            accumulate=ki > 0,
                        )
            return
        if ki < n_k - 1:
            return
        # The tail: n-outer over the last k-tiles, each output tile scaled, cast and stored
        # as soon as its last product is done.
        tok0 = blocks[bi][0] * gp
        window = [(s - ki + kj, kj) for kj in range(n_k - tail, n_k)]
        programs = [_tail_program(m, window, tb, tok0) for m in mm]
        interleave(programs)

    def _tail_program(m, window, tb, tok0):
        e, acc = m["e"], m["acc"]
        for n0, nl in tiles(m["cl"], m["tn_tail"]):
            for r0, rl in tiles(tb, tm):
                for sj, kj in window:
                    kl = k_tiles[kj][1]
                    k.matmul(
                        acc[r0 : r0 + rl, n0 : n0 + nl],
                        m["at"][sj % n_at][r0 : r0 + rl, :kl],
                        m["wt"][sj % n_w][:kl, n0 : n0 + nl],
                        accumulate=kj > 0,
                    )
                o = m["o"][m["stores"] % 2]
                for c0, cl in _row_chunks(rl, nl, vmax):
                    rows = slice(r0 + c0, r0 + c0 + cl)
                    k.vector("mul", o[c0 : c0 + cl, :nl], acc[rows, n0 : n0 + nl], m["r"][rows])
                cols = slice(m["c0"] + n0, m["c0"] + n0 + nl)
                k.dma(
                    out[tok0 + r0 : tok0 + r0 + rl, cols], o[:rl, :nl], queue=qs[e][m["stores"] % len(qs[e])]
                )
                m["stores"] += 1
                yield

    # Per step: pool it, build its operands, then prefetch the x slab and w tile two steps
    # ahead (behind this step's S exchange on the queues, so that the exchange never waits for
    # a bulk transfer, and ahead of the next one, so that the queues never idle), then its
    # matmuls. Queue order sets the startup's priorities: step 0's x slab and w tile go first.
    x_load(0)
    w_load(0)
    for s in range(len(steps)):
        pool_step(s)
        operand_step(s)
        for ahead in range(1, t.ahead + 1) if s == 0 else (t.ahead,):
            if s + ahead < len(steps):
                x_load(s + ahead)
                w_load(s + ahead)
        matmul_step(s)
    return out


mm_projector = Kernel("mm_projector", mm_projector_emit, mm_projector_fast, mm_projector_reference)

__all__ = [
    "patch_embed",
    "patch_embed_emit",
    "patch_embed_fast",
    "patch_embed_reference",
    "im2col",
    "choose_patch_tiling",
    "PatchTiling",
    "PATCH_MODES",
    "mm_projector",
    "mm_projector_emit",
    "mm_projector_fast",
    "mm_projector_reference",
    "choose_projector_tiling",
    "ProjectorTiling",
]
