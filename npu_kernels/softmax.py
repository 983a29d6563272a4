"""Row-wise softmax, numerically stable, for rows of any width (attention probabilities, ...).

    y[r, :] = exp(x[r, :] - max(x[r, :])) / sum(exp(x[r, :] - max(x[r, :]))),  fp32 math

IO (DRAM): x (..., C) in the device dtype (or fp32); out like x, same dtype. The softmax runs
over the last axis; leading axes are rows. Entries may be -inf (masked), even whole column
chunks or engine blocks; a row of -inf only gives NaN, as NumPy does; +inf and NaN are not
supported. Compile-time constants: ``plan`` (optional ``SoftmaxPlan``, chosen per shape by
``choose_plan`` otherwise).

Plan (every size from ``k.config``):

* Rows are split over ``G`` engine groups of ``g`` engines; the engines of a group split the
  columns (``g > 1`` when there are fewer rows than engines: a 262144-wide row uses all
  engines). Each engine streams its (rows, column block) in row tiles of ``tr`` rows and
  column chunks of ``cw`` columns (``tr * cw <= vector_max_elements``), loads on one DMA
  queue and stores on another, ``depth`` chunk buffers each (double buffering).
* Online max: each chunk c gets its own max ``m_c`` and ``e_c = exp(x_c - m_c)``, ``s_c =
  sum(e_c)``, so the SFU works on a chunk as soon as it lands. Per row tile, the partials
  combine as ``M = max_c m_c``, ``S = sum_c s_c * exp(m_c - M)`` (and across the group's
  engines: each sends its (max, sum) to every other by local-to-local DMA), and chunk c
  leaves as ``out_c = e_c * exp(m_c - M) / S``: one vector multiply, cast to the output dtype.
* When the fp32 ``e`` of a row tile does not fit in local SRAM (``resident`` False), pass 2
  reloads x from DRAM and recomputes ``exp(x - M) / S`` (one more read of x).

SRAM per engine: ``depth`` input and ``depth`` output chunks ``tr x cw``; resident: two fp32
row tiles ``tr x ceil(C / g)``, else two fp32 chunks; a few ``tr x chunks`` fp32 partials.
FLOPs: none on the matrix unit; per element 1 exp (SFU) and 3 vector ops (max, sum, scale).
Bandwidth bound: DRAM bytes = 2 x size(x) (3 x when not resident).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numba
import numpy as np

from npu_emulator import Kernel, KernelError
from npu_emulator.fixedmath import exp32
from npu_emulator.memory import itemsize
from npu_emulator.program import KernelContext, ceil_div, tiles

from .common import fastest, interleave, load_store_queues, rows_view, split


def softmax_reference(x: np.ndarray, **_) -> np.ndarray:
    g = x.astype(np.float64)
    e = np.exp(g - g.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@numba.njit(cache=True)  # one thread: see npu_kernels/hostmath.py
def _softmax_rows(x, out):
    rows, cols = x.shape
    for r in range(rows):
        m = x[r, 0]
        for c in range(1, cols):
            if x[r, c] > m:
                m = x[r, c]
        s = 0.0  # float64 accumulator: a 262144-term sum stays exact to fp32 rounding
        for c in range(cols):
            v = exp32(x[r, c] - m)
            out[r, c] = v
            s += v
        inv = np.float32(1.0 / s)
        for c in range(cols):
            out[r, c] = out[r, c] * inv


def softmax_fast(x: np.ndarray, **_) -> np.ndarray:
    g = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    out = np.empty_like(g)
    _softmax_rows(g, out)
    return out.reshape(x.shape)


FP32_LOWEST = float(np.finfo(np.float32).min)


@dataclass(frozen=True)
class SoftmaxPlan:
    g: int  # engines per row group (they split the columns)
    tr: int  # rows per tile
    cw: int  # columns per chunk
    resident: bool  # keep exp(x - m_c) of a row tile in SRAM (else recompute from x)
    depth: int = 2  # input / output chunk buffers per engine


def _sram_bytes(cfg, p: SoftmaxPlan, cols: int, esz: int) -> int:
    cb = ceil_div(cols, p.g)
    nch = ceil_div(cb, p.cw)
    slots = 2 * p.depth * p.tr * p.cw * esz
    scratch = 2 * p.tr * (cb if p.resident else p.cw) * 4
    # per-chunk pm, nm, ps, t, f; per-row M, nM, S, rS, pe (2), npe; part (2 g), wg (g); x2
    small = 2 * p.tr * (5 * nch + 7 + 3 * p.g) * 4
    padding = (2 * p.depth + 32) * cfg.sram_alignment  # each buffer rounded up to the granule
    return slots + scratch + small + padding


def _candidates(cfg, rows: int, cols: int, esz: int):
    e_count, vmax = cfg.num_engines, cfg.vector_max_elements
    gs = sorted({max(1, e_count // g_rows) for g_rows in range(1, min(rows, e_count) + 1)})
    out = []
    for g in gs:
        groups = min(rows, e_count // g)
        rpe = ceil_div(rows, groups)
        cb = ceil_div(cols, g)
        trs = sorted({max(1, min(vmax, ceil_div(rpe, d))) for d in (1, 2, 4, 8, 16, 32)})
        for tr in trs:
            cmax = max(1, vmax // tr)
            widths = {min(cb, cmax)} | {min(cmax, ceil_div(cb, d)) for d in (2, 4, 8)}
            for cw in sorted(widths):
                cw = ceil_div(cb, ceil_div(cb, cw))  # balanced chunks
                for resident in (True, False):
                    p = SoftmaxPlan(g, tr, cw, resident)
                    if not resident and ceil_div(cb, cw) == 1:
                        continue
                    if _sram_bytes(cfg, p, cols, esz) <= cfg.local_sram_bytes:
                        out.append(p)
    return out


def _estimate(cfg, rows: int, cols: int, esz: int, p: SoftmaxPlan) -> float:
    """Rough cycles: DRAM time plus the fill (first chunks) and drain (last row tile)."""
    groups = min(rows, cfg.num_engines // p.g)
    engines = groups * p.g
    rpe = ceil_div(rows, groups)
    cb = ceil_div(cols, p.g)
    nch = ceil_div(cb, p.cw)
    passes = 2 if p.resident else 3
    dram = passes * rows * cols * esz / cfg.dram_bytes_per_cycle
    chunk = p.tr * p.cw
    per_chunk = 3 * (cfg.vector_latency + chunk / cfg.vector_lanes) + cfg.sfu_latency + chunk / cfg.sfu_lanes
    tiles_pe = ceil_div(rpe, p.tr)
    compute = tiles_pe * nch * per_chunk + tiles_pe * (
        12 * cfg.vector_latency + (p.g > 1) * 3 * cfg.dma_sram_latency
    )
    fill = cfg.dma_dram_latency + engines * chunk * esz / cfg.dram_bytes_per_cycle
    drain = per_chunk + 12 * cfg.vector_latency + cfg.dma_dram_latency
    drain += engines * p.tr * cb * esz / cfg.dram_bytes_per_cycle / max(1, tiles_pe)
    instrs = engines * tiles_pe * nch * 8
    return max(dram, compute) + fill + drain + instrs


TRIALS = 6  # candidates scheduled per shape


@functools.lru_cache(maxsize=256)
def choose_plan(cfg, rows: int, cols: int, dtype: str = "bf16") -> SoftmaxPlan:
    """Rank candidate plans by a cost estimate, schedule the best few (trace only), keep the
    fastest."""
    esz = itemsize(dtype)
    cands = _candidates(cfg, rows, cols, esz)
    if not cands:
        raise KernelError(
            f"softmax: no plan for ({rows}, {cols}) {dtype} fits {cfg.local_sram_bytes} B of local SRAM"
        )
    cands.sort(key=lambda p: _estimate(cfg, rows, cols, esz, p))
    return fastest(cands[:TRIALS], lambda p: _trial(cfg, rows, cols, dtype, p))


def _trial(cfg, rows, cols, dtype, p: SoftmaxPlan) -> float:
    from npu_emulator.memory import DRAM, Buffer
    from npu_emulator.timing import schedule

    ctx = KernelContext("softmax-trial", cfg, execute=False, dtype=dtype)
    x = Buffer("x", DRAM, (rows, cols), dtype, 0, 0)
    softmax_emit(ctx, x, plan=p)
    return schedule(ctx.stream(), cfg).total


def _dma_split(k, dst, src, qs: list[int]) -> None:
    """One region copied as near-equal pieces on several queues (first axis, else the last)."""
    axis = 0 if dst.shape[0] >= len(qs) or len(dst.shape) == 1 else len(dst.shape) - 1
    parts = split(dst.shape[axis], len(qs))
    for q, (s0, sl) in zip(qs, parts):
        idx = tuple(slice(s0, s0 + sl) if a == axis else slice(None) for a in range(len(dst.shape)))
        k.dma(dst[idx], src[idx], queue=q)


def softmax_emit(k, x, *, plan: SoftmaxPlan | None = None):
    cfg = k.config
    cols = x.shape[-1]
    # 2-D tensors as slice views: dependency tracking then tells their tiles apart.
    x2 = x if len(x.shape) == 2 else rows_view(x)
    rows = x2.shape[0]
    p = plan or choose_plan(cfg, rows, cols, x.dtype)
    out = k.output(x.shape, x.dtype, name="out")
    o2 = out if len(x.shape) == 2 else rows_view(out)
    groups = min(rows, cfg.num_engines // p.g)
    col_blocks = split(cols, p.g)
    g = len(col_blocks)
    if p.tr * p.cw > cfg.vector_max_elements:
        raise KernelError(
            f"softmax: a chunk of {p.tr} x {p.cw} exceeds vector_max_elements = {cfg.vector_max_elements}"
        )
    states = []
    for gi, (r0, rl) in enumerate(split(rows, groups)):
        members = []
        for gj, (c0, cl) in enumerate(col_blocks):
            e = gi * p.g + gj
            members.append(_alloc_engine(k, e, x.dtype, (r0, rl), (c0, cl), gj, g, p))
        for st in members:
            st["group"] = members
        states += members
    by_group: dict[int, list] = {}
    for st in states:
        by_group.setdefault(id(st["group"]), []).append(_engine_program(k, st, x2, o2, p))
    programs = [_lockstep(progs) for progs in by_group.values()]
    interleave(programs)
    return out


def _alloc_engine(k, e, dtype, rr, cc, gj, g, p: SoftmaxPlan):
    tr, cw = p.tr, p.cw
    cb = cc[1]
    chunks = list(tiles(cb, cw))
    nch = len(chunks)

    def fp(shape, name):
        return [k.alloc(shape, "fp32", engine=e, name=f"{name}{i}_e{e}") for i in range(2)]

    st = {
        "e": e,
        "rows": rr,
        "cols": cc,
        "gj": gj,
        "g": g,
        "chunks": chunks,
        "xs": [k.alloc((tr, cw), dtype, engine=e, name=f"x{s}_e{e}") for s in range(p.depth)],
        "os": [k.alloc((tr, cw), dtype, engine=e, name=f"o{s}_e{e}") for s in range(p.depth)],
        "ex": fp((tr, cb if p.resident else cw), "exp"),
        "pm": fp((tr, nch), "pm"),  # per-chunk max
        "nm": fp((tr, nch), "nm"),  # its negation (the SFU's bias)
        "ps": fp((tr, nch), "ps"),  # per-chunk sum of exp(x - m_c)
        "t": fp((tr, nch), "t"),
        "f": fp((tr, nch), "f"),  # per-chunk output factor exp(m_c - M) / S
        "M": fp((tr, 1), "M"),
        "nM": fp((tr, 1), "nM"),
        "S": fp((tr, 1), "S"),
        "rS": fp((tr, 1), "rS"),
    }
    if g > 1:
        st["pe"] = fp((tr, 2), "pe")  # this engine's (max, sum) per row
        st["npe"] = fp((tr, 1), "npe")
        st["part"] = fp((tr, g, 2), "part")  # every group member's (max, sum)
        st["wg"] = fp((tr, g), "wg")
    st["lq"], st["sq"] = load_store_queues(k.config, e)
    return st


def _engine_program(k, st, x2, o2, p: SoftmaxPlan):
    (r0, rl), (c0, _) = st["rows"], st["cols"]
    chunks = st["chunks"]
    lq, sq = st["lq"], st["sq"]
    step = ostep = 0
    for ti, (t0, tl) in enumerate(tiles(rl, p.tr)):
        par = ti % 2
        rsl = slice(r0 + t0, r0 + t0 + tl)
        pm, nm, ps = st["pm"][par][:tl], st["nm"][par][:tl], st["ps"][par][:tl]
        ex = st["ex"][par if p.resident else 0]
        pending = None  # the row sum of the previous chunk, issued after this chunk's exp
        for ci, (a0, al) in enumerate(chunks):
            xt = st["xs"][step % p.depth][:tl, :al]
            _dma_split(k, xt, x2[rsl, c0 + a0 : c0 + a0 + al], lq)
            col = slice(ci, ci + 1)
            k.reduce("max", pm[:, col], xt)
            # A chunk masked to -inf entirely: keep its max finite, so exp(x - m_c) is 0, not NaN.
            k.vector("max", pm[:, col], pm[:, col], FP32_LOWEST)
            k.vector("neg", nm[:, col], pm[:, col])
            if p.resident:
                et = ex[:tl, a0 : a0 + al]
            else:
                et = st["ex"][step % 2][:tl, :al]
            k.activation("exp", et, xt, bias=nm[:, col])
            if pending is not None:
                k.reduce("sum", *pending)
            pending = (ps[:, col], et)
            step += 1
            yield
        k.reduce("sum", *pending)
        yield from _combine(k, st, par, tl, p)
        f, nM, rS = st["f"][par][:tl], st["nM"][par][:tl], st["rS"][par][:tl]
        for ci, (a0, al) in enumerate(chunks):
            ot = st["os"][ostep % p.depth][:tl, :al]
            if p.resident:
                k.vector("mul", ot, ex[:tl, a0 : a0 + al], f[:, ci : ci + 1])
            else:
                xt = st["xs"][step % p.depth][:tl, :al]
                _dma_split(k, xt, x2[rsl, c0 + a0 : c0 + a0 + al], lq)
                et = st["ex"][step % 2][:tl, :al]
                k.activation("exp", et, xt, bias=nM)
                k.vector("mul", ot, et, rS)
                step += 1
            _dma_split(k, o2[rsl, c0 + a0 : c0 + a0 + al], ot, sq)
            ostep += 1
            yield


BARRIER = "barrier"


def _lockstep(programs):
    """Run a group's engine programs step by step, interleaved; at a ``BARRIER`` a program
    waits until every member has reached it (so partials are sent before they are read)."""
    state = [None] * len(programs)  # None running, BARRIER waiting, True finished
    while True:
        running = [i for i, s in enumerate(state) if s is None]
        if not running:
            if all(s is True for s in state):
                return
            state = [None if s == BARRIER else s for s in state]
            continue
        for i in running:
            r = next(programs[i], True)
            if r is not None:
                state[i] = r
        yield


def _combine(k, st, par, tl, p: SoftmaxPlan):
    """From per-chunk (max, sum) partials: nM = -M, rS = 1 / S and, resident, the per-chunk
    output factors f_c = exp(m_c - M) / S."""
    nch, g = len(st["chunks"]), st["g"]
    pm, ps, t, f = (st[n][par][:tl] for n in ("pm", "ps", "t", "f"))
    M, nM, S, rS = (st[n][par][:tl] for n in ("M", "nM", "S", "rS"))
    if g == 1 and nch == 1 and p.resident:
        k.activation("reciprocal", f, ps)  # M = m_0: the factor is 1 / s_0
        yield
        return
    if g == 1:
        k.reduce("max", M, pm)
        k.vector("neg", nM, M)
        k.activation("exp", t, pm, bias=nM)
        k.vector("mul", t, t, ps)
        k.reduce("sum", S, t)
    else:
        pe, npe = st["pe"][par][:tl], st["npe"][par][:tl]
        k.reduce("max", pe[:, 0:1], pm)
        k.vector("neg", npe, pe[:, 0:1])
        k.activation("exp", t, pm, bias=npe)
        k.vector("mul", t, t, ps)
        k.reduce("sum", pe[:, 1:2], t)
        gj = st["gj"]
        for other in st["group"]:  # all-to-all: every member combines the group's partials
            dst = other["part"][par][:tl, gj, :]
            if other is st:
                k.vector("copy", dst, pe)
            else:
                k.dma(dst, pe, queue=st["sq"][0])
        yield BARRIER  # every member has sent its partials before any reads them
        part, wg = st["part"][par][:tl], st["wg"][par][:tl]
        k.reduce("max", M, part[:, :, 0])
        k.vector("neg", nM, M)
        k.activation("exp", wg, part[:, :, 0], bias=nM)
        k.vector("mul", wg, wg, part[:, :, 1])
        k.reduce("sum", S, wg)
    k.activation("reciprocal", rS, S)
    if p.resident:
        k.activation("exp", f, pm, bias=nM)
        k.vector("mul", f, f, rS)
    yield


softmax = Kernel("softmax", softmax_emit, softmax_fast, softmax_reference)

__all__ = ["softmax", "softmax_emit", "softmax_fast", "softmax_reference", "SoftmaxPlan", "choose_plan"]
