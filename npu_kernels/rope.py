"""Rotary position embedding (RoPE), rotate-half form, as Hugging Face's Gemma3 applies it.

    out = x * cos[pos] + rotate_half(x) * sin[pos],  rotate_half(x) = concat(-x2, x1)

with x1, x2 the first and second halves of each head's ``head_dim`` values. ``rope_tables``
builds the tables on the host exactly as ``Gemma3RotaryEmbedding`` does (float32):
``inv_freq = 1 / base ** (arange(0, hd, 2) / hd) / scaling_factor`` (linear scaling),
``emb = concat(outer(positions, inv_freq), same)``, ``cos(emb)``, ``sin(emb)``.

IO (DRAM): x (T, H, hd) queries or keys, device dtype (or fp32); cos_table, sin_table
(P, hd), stored in the device dtype as HF casts them to x's dtype (fp32 tables work too);
positions (T,) int32, arbitrary position ids in [0, P). out (T, H, hd) in x's dtype; the math
is fp32. No compile-time constants besides the optional ``plan`` (``RopePlan``).

Plan (``choose_plan``, per shape): tokens are split over ``gt`` engine groups and heads over
``gh`` engines per group (``gh > 1`` only when there are fewer tokens than engines, e.g.
decode). Each engine loads its position ids once, then streams tiles of ``tt`` tokens: the x
tile by DMA and the tile's cos and sin rows by ``k.gather`` (indirect DMA on the position ids
in local SRAM), on its load queue(s); the rotated tile leaves on its store queue(s); ``depth``
buffers each, so loads and stores overlap the vector unit. Per tile and group of heads (at
most ``vector_max_elements`` per instruction): ``A = x * cos``, ``B1 = x2 * -sin1``,
``B2 = x1 * sin2``, ``out = A + B`` (4 vector instructions, 3 element-passes).

SRAM per engine: ``depth`` x (x tile + out tile + cos and sin rows) + two fp32 scratch
tiles of one head group. FLOPs: none on the matrix unit; 3 vector ops per element.
Bandwidth bound: DRAM bytes = 2 x size(x) + 2 x T x hd x table element size (rows gathered)
+ 4 T (positions); the report's compulsory bytes count the whole tables instead.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numba
import numpy as np

from npu_emulator import Kernel, KernelError
from npu_emulator.memory import itemsize
from npu_emulator.program import KernelContext, ceil_div, tiles

from .common import fastest, index_queue, interleave, load_store_queues, split


def rope_tables(
    max_positions: int, head_dim: int, base: float, scaling_factor: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each (max_positions, head_dim) float32, as Gemma3RotaryEmbedding computes
    them in float32 (default rope, or linear scaling by ``scaling_factor``)."""
    if head_dim % 2:
        raise ValueError(f"rope_tables: head_dim must be even, got {head_dim}")
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    # base ** exponent rounded once to float32 (as torch's float32 pow), then 1 / it in float32.
    power = np.power(np.float64(base), exponent.astype(np.float64)).astype(np.float32)
    inv_freq = (np.float32(1.0) / power).astype(np.float32)
    inv_freq = (inv_freq / np.float32(scaling_factor)).astype(np.float32)
    positions = np.arange(max_positions, dtype=np.float32)
    freqs = np.outer(positions, inv_freq).astype(np.float32)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def rotate_half(x: np.ndarray) -> np.ndarray:
    h2 = x.shape[-1] // 2
    return np.concatenate([-x[..., h2:], x[..., :h2]], axis=-1)


def rope_reference(x, cos_table, sin_table, positions, **_) -> np.ndarray:
    g = x.astype(np.float64)
    c = cos_table.astype(np.float64)[positions][:, None, :]
    s = sin_table.astype(np.float64)[positions][:, None, :]
    return g * c + rotate_half(g) * s


@numba.njit(cache=True)  # one thread: see npu_kernels/hostmath.py
def _rope_rows(x, cos, sin, pos, out):
    tokens, heads, hd = x.shape
    h2 = hd // 2
    for t in range(tokens):
        p = pos[t]
        for h in range(heads):
            for i in range(h2):
                x1 = x[t, h, i]
                x2 = x[t, h, i + h2]
                out[t, h, i] = x1 * cos[p, i] + x2 * -sin[p, i]
                out[t, h, i + h2] = x2 * cos[p, i + h2] + x1 * sin[p, i + h2]


def _check(name, x_shape, cos_shape, sin_shape, pos_shape):
    if len(x_shape) != 3 or x_shape[-1] % 2:
        raise KernelError(f"{name}: x must be (T, H, head_dim) with an even head_dim, got {x_shape}")
    hd = x_shape[-1]
    if len(cos_shape) != 2 or cos_shape[1] != hd or tuple(sin_shape) != tuple(cos_shape):
        raise KernelError(f"{name}: tables {cos_shape} and {sin_shape} must both be (P, {hd})")
    if tuple(pos_shape) != (x_shape[0],):
        raise KernelError(f"{name}: positions {pos_shape} must be ({x_shape[0]},)")


def rope_fast(x, cos_table, sin_table, positions, **_) -> np.ndarray:
    _check("rope", x.shape, cos_table.shape, sin_table.shape, positions.shape)
    pos = np.ascontiguousarray(positions, dtype=np.int64)
    if pos.size and (pos.min() < 0 or pos.max() >= cos_table.shape[0]):
        raise KernelError(
            f"rope: positions must lie in [0, {cos_table.shape[0]}), got {pos.min()}..{pos.max()}"
        )
    xf = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(xf)
    # Only the rows read, widened (the tables may be held in bf16): row t is position pos[t].
    c = np.ascontiguousarray(cos_table[pos], dtype=np.float32)
    s = np.ascontiguousarray(sin_table[pos], dtype=np.float32)
    _rope_rows(xf, c, s, np.arange(pos.size), out)
    return out


@dataclass(frozen=True)
class RopePlan:
    gh: int  # engines sharing one token block, each taking a block of heads
    tt: int  # tokens per tile
    depth: int = 2


def _fits(cfg, tpe, heads, hd, esz, tsz, p: RopePlan) -> bool:
    """Local SRAM of one engine: its position ids, ``depth`` x (x, out, cos, sin) tiles, the
    negated sines and two fp32 scratch tiles (plus each buffer's alignment padding)."""
    hn = ceil_div(heads, p.gh)
    hc = max(1, min(hn, cfg.vector_max_elements // (p.tt * hd)))
    tile = p.depth * p.tt * (2 * hn * hd * esz + 2 * hd * tsz)
    scratch = 2 * p.tt * hc * hd * 4 + p.tt * hd // 2 * 4
    padding = (4 * p.depth + 4) * cfg.sram_alignment
    return 4 * tpe + tile + scratch + padding <= cfg.local_sram_bytes


def _estimate(cfg, tokens, heads, hd, esz, tsz, p: RopePlan) -> float:
    gt = min(tokens, cfg.num_engines // p.gh)
    engines = gt * p.gh
    tpe = ceil_div(tokens, gt)
    hn = ceil_div(heads, p.gh)
    n_tiles = ceil_div(tpe, p.tt)
    dram = (2 * tokens * heads * hd * esz + engines * tpe * 2 * hd * tsz) / cfg.dram_bytes_per_cycle
    elems = p.tt * hn * hd
    hc = max(1, min(hn, cfg.vector_max_elements // (p.tt * hd)))
    per_tile = 4 * ceil_div(hn, hc) * cfg.vector_latency + 3 * elems / cfg.vector_lanes
    fill = (
        2 * cfg.dma_dram_latency + engines * p.tt * (hn * hd * esz + 2 * hd * tsz) / cfg.dram_bytes_per_cycle
    )
    drain = per_tile + cfg.dma_dram_latency + engines * elems * esz / cfg.dram_bytes_per_cycle
    return max(dram, n_tiles * per_tile) + fill + drain + engines * n_tiles * 8


TRIALS = 6


@functools.lru_cache(maxsize=256)
def choose_plan(
    cfg, tokens: int, heads: int, hd: int, dtype: str = "bf16", table_dtype: str = "bf16"
) -> RopePlan:
    esz, tsz = itemsize(dtype), itemsize(table_dtype)
    cands = []
    for gh in sorted(
        {1} | {d for d in range(1, min(heads, cfg.num_engines) + 1) if tokens < cfg.num_engines}
    ):
        gt = min(tokens, cfg.num_engines // gh)
        tpe = ceil_div(tokens, gt)
        for d in (1, 2, 3, 4, 6, 8, 16):
            p = RopePlan(gh, max(1, min(ceil_div(tpe, d), cfg.vector_max_elements // hd)))
            if p not in cands and _fits(cfg, tpe, heads, hd, esz, tsz, p):
                cands.append(p)
    if not cands:
        raise KernelError(
            f"rope: no tile of (H, hd) = ({heads}, {hd}) fits {cfg.local_sram_bytes} B of local SRAM"
        )
    cands.sort(key=lambda p: _estimate(cfg, tokens, heads, hd, esz, tsz, p))
    return fastest(cands[:TRIALS], lambda p: _trial(cfg, tokens, heads, hd, dtype, table_dtype, p))


def _trial(cfg, tokens, heads, hd, dtype, table_dtype, p) -> float:
    from npu_emulator.memory import DRAM, Buffer
    from npu_emulator.timing import schedule

    ctx = KernelContext("rope-trial", cfg, execute=False, dtype=dtype)
    x = Buffer("x", DRAM, (tokens, heads, hd), dtype, 0, 0)
    c = Buffer("cos", DRAM, (max(1, tokens), hd), table_dtype, 0, 0)
    s = Buffer("sin", DRAM, (max(1, tokens), hd), table_dtype, 0, 0)
    pos = Buffer("positions", DRAM, (tokens,), "int32", 0, 0)
    rope_emit(ctx, x, c, s, pos, plan=p)
    return schedule(ctx.stream(), cfg).total


def rope_emit(k, x, cos_table, sin_table, positions, *, plan: RopePlan | None = None):
    _check("rope", x.shape, cos_table.shape, sin_table.shape, positions.shape)
    if positions.dtype != "int32":
        raise KernelError(f"rope: positions must be int32, got {positions.dtype}")
    if cos_table.dtype != sin_table.dtype:
        raise KernelError(f"rope: cos is {cos_table.dtype}, sin is {sin_table.dtype}")
    cfg = k.config
    tokens, heads, hd = x.shape
    if hd > cfg.vector_max_elements:
        raise KernelError(f"rope: head_dim {hd} exceeds vector_max_elements {cfg.vector_max_elements}")
    p = plan or choose_plan(cfg, tokens, heads, hd, x.dtype, cos_table.dtype)
    if p.tt * hd > cfg.vector_max_elements:
        raise KernelError(
            f"rope: {p.tt} tokens x head_dim {hd} exceed vector_max_elements {cfg.vector_max_elements}"
        )
    out = k.output(x.shape, x.dtype, name="out")
    # Compulsory traffic: x in and out, the positions, and the cos/sin rows gathered.
    xb, tb_ = itemsize(x.dtype), itemsize(cos_table.dtype)
    k.set_roofline_bytes(tokens * 4 + 2 * x.size * xb + 2 * tokens * hd * tb_)
    gt = min(tokens, cfg.num_engines // p.gh)
    programs = []
    for gi, tb in enumerate(split(tokens, gt)):
        for gj, hb in enumerate(split(heads, p.gh)):
            e = gi * p.gh + gj
            programs.append(_engine_program(k, e, x, cos_table, sin_table, positions, out, tb, hb, p))
    interleave(programs)
    return out


def _engine_program(k, e, x, cos_t, sin_t, positions, out, tb, hb, p: RopePlan):
    cfg = k.config
    (t0, tn), (h0, hn) = tb, hb
    hd = x.shape[-1]
    h2 = hd // 2
    tt = p.tt
    hc = max(1, min(hn, cfg.vector_max_elements // (tt * hd)))  # heads per instruction
    lq, sq = load_store_queues(cfg, e)
    pos = k.alloc((tn,), "int32", engine=e, name=f"pos_e{e}")
    # Not on a gather queue: a queue overlaps its descriptors' latencies, so a gather behind
    # the load of its indices on the same queue would not wait for them.
    k.dma(pos, positions[t0 : t0 + tn], queue=index_queue(cfg, lq, sq))
    xs = [k.alloc((tt, hn, hd), x.dtype, engine=e, name=f"x{s}_e{e}") for s in range(p.depth)]
    os_ = [k.alloc((tt, hn, hd), out.dtype, engine=e, name=f"o{s}_e{e}") for s in range(p.depth)]
    cs = [k.alloc((tt, hd), cos_t.dtype, engine=e, name=f"cos{s}_e{e}") for s in range(p.depth)]
    ss = [k.alloc((tt, hd), sin_t.dtype, engine=e, name=f"sin{s}_e{e}") for s in range(p.depth)]
    nsin = k.alloc((tt, h2), "fp32", engine=e, name=f"nsin_e{e}")
    sa = k.alloc((tt, hc, hd), "fp32", engine=e, name=f"a_e{e}")
    sb = k.alloc((tt, hc, hd), "fp32", engine=e, name=f"b_e{e}")
    for i, (a0, al) in enumerate(tiles(tn, tt)):
        s = i % p.depth
        tok = slice(t0 + a0, t0 + a0 + al)
        xt, ot, ct, st = xs[s][:al], os_[s][:al], cs[s][:al], ss[s][:al]
        parts = list(zip(lq, split(al, len(lq))))
        for q, (s0, sl) in parts:
            k.dma(xt[s0 : s0 + sl], x[tok.start + s0 : tok.start + s0 + sl, h0 : h0 + hn, :], queue=q)
        for q, (s0, sl) in parts:
            idx = pos[a0 + s0 : a0 + s0 + sl]
            k.gather(ct[s0 : s0 + sl], cos_t, idx, queue=q)
            k.gather(st[s0 : s0 + sl], sin_t, idx, queue=q)
        # (al, 1, w) views of the tables broadcast over heads.
        c_all = cs[s].region(0, (al, 1, hd), (hd, hd, 1))
        s_hi = ss[s].region(h2, (al, 1, h2), (hd, hd, 1))
        ns_lo = nsin.region(0, (al, 1, h2), (h2, h2, 1))
        k.vector("neg", nsin[:al], st[:, :h2])
        for c0, cl in tiles(hn, hc):
            xc, oc = xt[:, c0 : c0 + cl, :], ot[:, c0 : c0 + cl, :]
            a, b = sa[:al, :cl, :], sb[:al, :cl, :]
            k.vector("mul", a, xc, c_all)
            k.vector("mul", b[:, :, :h2], xc[:, :, h2:], ns_lo)
            k.vector("mul", b[:, :, h2:], xc[:, :, :h2], s_hi)
            k.vector("add", oc, a, b)  # cast to the output dtype on the way out
        for q, (s0, sl) in zip(sq, split(al, len(sq))):
            k.dma(out[tok.start + s0 : tok.start + s0 + sl, h0 : h0 + hn, :], ot[s0 : s0 + sl], queue=q)
        yield


rope = Kernel("rope", rope_emit, rope_fast, rope_reference)

__all__ = [
    "rope",
    "rope_emit",
    "rope_fast",
    "rope_reference",
    "rope_tables",
    "rotate_half",
    "RopePlan",
    "choose_plan",
]
