"""Linear / matmul: ``out (M, N) = epilogue(a (M, K) @ b (K, N))``, tiled over every engine.

Kernels (inputs are DRAM tensors, keywords are compile-time constants):

* ``matmul(a, b, *, activation=None, out_dtype=None, depth=2, tiling=None)``
* ``linear(a, b, bias, *, activation=None, out_dtype=None, depth=2, tiling=None)``:
  ``activation(a @ b + bias)``, the bias added (and the activation applied) to each finished
  tile in SRAM before it leaves: no extra pass over DRAM.

IO (DRAM): a (M, K) activations, b (K, N) weights in device layout (pre-transposed: K rows),
bias (N,), out (M, N) in ``out_dtype`` (the device dtype unless given). a and b share one float
dtype. ``activation`` is None or a special-function-unit function (``"gelu_tanh"``, ...).
Accumulation is fp32 on the matrix unit; the epilogue is one instruction per chunk of a
finished tile: a vector ``copy`` (the cast), a vector ``add`` of the bias row, or one SFU
``activation(acc + bias)``, all reading the fp32 accumulator and writing the output dtype.

Plan (every size from ``k.config``; chosen by ``choose_tiling``, cached per shape):

* Engines form a grid ``gm x gn``: engine (i, j) owns the rows of block i and the columns of
  block j of ``out``, in whole MAC-array widths, or split evenly (``even``: where the matrix
  unit waits for DRAM anyway, as at M = 1, equal bytes per engine count, not whole passes).
* Each engine keeps its rows of a resident in local SRAM (loaded in its first panel) when they
  fit. Its columns go in panels of ``tn`` (one fp32 accumulator tile each, double-buffered
  across panels); per panel, k-steps of ``tk`` stream b through ``depth`` tile buffers. A tile
  moves and multiplies in chunks of ``tc`` columns cut into pieces of ``kc`` rows: one
  descriptor and one matmul (per row tile) each, so the first matmul waits for one chunk, not
  a tile, and loads, matmuls and stores overlap at that grain.
* The loads of k-step s + 1 are issued while k-step s computes (spread over its chunks): in
  every queue (queues serve their descriptors in order) they sit ahead of the stores, which
  wait for compute. After the last k-step a chunk's epilogue and store follow its matmuls at
  once, overlapping the next chunk's: the drain is one chunk's matmul, epilogue and store.
* An operand that several engines read (a when gn > 1, b when gm > 1) is staged once into
  shared SRAM (one buffer per k-step), in the units the engines take it: a piece of a for all
  rows, a chunk of b in every engine column block. A staging program, stepped after the
  engines, issues each unit ``ahead`` units before the engines load it. When b is staged,
  ``stage_queues`` queues (enough to saturate DRAM) carry only staging and the engines share
  the others in groups, dealing every descriptor to the next queue of the group; otherwise
  each engine owns ``dma_queues / engines`` queues (weights on one, a and the stores on another,
  or dealt in turn over three or more).
* Engines' programs are interleaved step by step in program order.
* ``choose_tiling`` ranks every candidate (grid, steps, panels, chunks, pieces, column split)
  by an estimate (``_estimate``: the slowest of the matrix unit, DRAM, the queues and the
  per-step DMA latency, plus start and drain, plus a host-time charge per instruction), then
  schedules the best ``TRIALS`` (no values, trace only; ``TRIAL_BUDGET`` instructions in all)
  and keeps the fastest. With ``depth`` 1 a tile is one matmul wide and not cut (its loads
  wait for its matmuls).

The same tiled program (``Job``, ``build_job``) also runs a *gated* pair of weights: two
accumulators per tile, ``act(a @ b0 [+ bias]) * (a @ b1)`` (GeGLU), with a read from shared
SRAM and the result written to shared SRAM: ``npu_kernels/mlp.py`` chains two such jobs.

SRAM per engine: a rows ``Mp * K`` (or ``depth`` a tiles per row tile), ``depth`` b tiles
``TK x TN`` per weight (a buffer per chunk), one or two fp32 accumulators ``Mp x TN`` per weight,
two output tiles ``TM x TN``, the bias columns ``Np``; shared SRAM: the staged operands
(``stage_bytes``).
FLOPs: ``2 * M * K * N`` per weight. Compulsory DRAM bytes: ``(M*K + K*N + N) * elt + M*N *
out elt`` (the bias term for ``linear`` only).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import numba
import numpy as np

from npu_emulator import Kernel, KernelError
from npu_emulator.bf16 import round_value
from npu_emulator.fixedmath import gelu_tanh32
from npu_emulator.memory import DRAM, SHARED, Buffer
from npu_emulator.program import KernelContext, ceil_div, tiles
from npu_emulator.units import SFU

from . import hostmath
from .common import interleave

DTYPE_BYTES = {"bf16": 2, "fp32": 4}
SQRT_2_OVER_PI = 0.7978845608028654


# ----------------------------------------------------------------- references and fast twins


def gelu_tanh_reference(z: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (Gemma's ``gelu_pytorch_tanh``), in float64."""
    z = np.asarray(z, np.float64)
    return 0.5 * z * (1.0 + np.tanh(SQRT_2_OVER_PI * (z + 0.044715 * z**3)))


def _activation_reference(z: np.ndarray, activation: str | None) -> np.ndarray:
    if activation is None:
        return z
    if activation == "gelu_tanh":
        return gelu_tanh_reference(z)
    return SFU[activation](z)


def matmul_reference(a: np.ndarray, b: np.ndarray, *, activation: str | None = None, **_) -> np.ndarray:
    return _activation_reference(a.astype(np.float64) @ b.astype(np.float64), activation)


def linear_reference(
    a: np.ndarray, b: np.ndarray, bias: np.ndarray, *, activation: str | None = None, **_
) -> np.ndarray:
    z = a.astype(np.float64) @ b.astype(np.float64) + bias.astype(np.float64)
    return _activation_reference(z, activation)


@numba.njit(cache=True)  # one thread: see npu_kernels/hostmath.py
def _bias_gelu_rows(y, bias, gelu):
    """In place: ``y[r, c] = gelu?(y[r, c] + bias[c])``, fp32, rows in parallel."""
    rows, cols = y.shape
    for r in range(rows):
        for c in range(cols):
            v = y[r, c] + bias[c]
            y[r, c] = gelu_tanh32(v) if gelu else v


@numba.njit(cache=True)  # one thread: see npu_kernels/hostmath.py
def geglu_into(g, u, out, n0, n1, bf16):
    """``out[:, n0:n1] = gelu_tanh(g) * u`` there, in fp32, rounded to bfloat16 when ``bf16``
    (as a bf16 tensor stores it): the GeGLU of every host path (``geglu_fast``, the MLP's
    products loop in ``npu_kernels/mlp.py``, the fused decode layer in ``gemma3/host_fused.py``)."""
    for r in range(g.shape[0]):
        # Row slices: indexed from 0, the loop vectorises (indexed from n0 it did not: 10x slower)
        gr, ur, row = g[r, n0:n1], u[r, n0:n1], out[r, n0:n1]
        for c in range(row.shape[0]):
            row[c] = round_value(gelu_tanh32(gr[c]) * ur[c], bf16)


def bias_activation_fast(y: np.ndarray, bias, activation: str | None) -> np.ndarray:
    """``activation(y + bias)`` on an fp32 (rows, cols) array, in place where it can."""
    y = np.ascontiguousarray(y, dtype=np.float32)
    if activation in (None, "gelu_tanh"):
        if bias is None and activation is None:
            return y
        b = np.zeros(y.shape[1], np.float32) if bias is None else np.asarray(bias, np.float32)
        _bias_gelu_rows(y, np.ascontiguousarray(b), activation == "gelu_tanh")
        return y
    if bias is not None:
        y += np.asarray(bias, np.float32)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        return SFU[activation](y).astype(np.float32)


def geglu_fast(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``gelu_tanh(g) * u`` elementwise (fp32, Numba)."""
    g = np.ascontiguousarray(g, dtype=np.float32)
    out = np.empty_like(g)
    geglu_into(g, np.ascontiguousarray(u, dtype=np.float32), out, 0, g.shape[1], False)
    return out


def matmul_fast(a: np.ndarray, b: np.ndarray, *, activation: str | None = None, **_) -> np.ndarray:
    return bias_activation_fast(hostmath.matmul(a, b), None, activation)


def linear_fast(
    a: np.ndarray, b: np.ndarray, bias: np.ndarray, *, activation: str | None = None, **_
) -> np.ndarray:
    return bias_activation_fast(hostmath.matmul(a, b), bias, activation)


def flops(m: int, k: int, n: int) -> int:
    """2 FLOPs (multiply, add) per multiply-add."""
    return 2 * m * k * n


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Epilogue:
    """What a finished fp32 accumulator tile goes through in SRAM before it leaves."""

    bias: bool = False  # + a (N,) bias row
    activation: str | None = None  # then this SFU function
    gated: bool = False  # two weights: act(a @ b0 + bias) * (a @ b1)

    @property
    def weights(self) -> int:
        return 2 if self.gated else 1


PLAIN = Epilogue()


@dataclass(frozen=True)
class Tiling:
    gm: int  # engine grid rows (blocks of M)
    gn: int  # engine grid columns (blocks of N)
    tk: int  # contraction step: rows of a buffered b tile
    tn: int  # panel: columns of a buffered b tile and of an accumulator tile
    depth: int = 2  # b (and a) tile buffers per engine
    stage_a: bool = False  # copy a once to shared SRAM (gn > 1 engines read each row)
    stage_b: bool = False  # copy b once to shared SRAM (gm > 1 engines read each column)
    tc: int = 0  # chunk: columns per b descriptor, matmul and store (0: the panel, in matmuls)
    kc: int = 0  # piece: contraction rows per b descriptor and matmul (0: the k-step)
    even: bool = False  # N split evenly over engine columns (else in whole MAC-array widths)
    stage_queues: int = 0  # queues kept for staging (the engines share the rest); 0: all share
    ahead: int = 0  # staging units issued ahead of the engines' loads

    def chunk(self, cfg) -> int:
        """Columns of a chunk: ``tc``, else the panel in as few matmuls as the unit takes."""
        return self.tc or _wide(cfg, self)

    @property
    def piece(self) -> int:
        return self.kc or self.tk

    def blocks(self, cfg, m: int, n: int) -> tuple[int, int]:
        """Rows and columns per engine; columns in whole MAC-array widths unless ``even``."""
        mp = ceil_div(m, self.gm)
        if self.even:
            return mp, ceil_div(n, self.gn)
        np_ = min(n, ceil_div(ceil_div(n, cfg.mac_cols), self.gn) * cfg.mac_cols)
        return mp, np_


def _balanced(total: int, tile: int, unit: int) -> int:
    """The smallest multiple of ``unit`` that covers ``total`` in as many tiles as ``tile`` does."""
    count = ceil_div(total, tile)
    return min(tile, ceil_div(ceil_div(total, count), unit) * unit)


def _aligned(nbytes: int, alignment: int) -> int:
    """Bytes an allocation of ``nbytes`` takes (the allocator rounds up to its granule)."""
    return max(alignment, ceil_div(nbytes, alignment) * alignment)


def _layout(cfg, rows, kk, cols, t: Tiling, esz, out_esz, ep: Epilogue) -> tuple[bool, int]:
    """(a resident?, local SRAM bytes) of an engine owning ``rows`` x ``cols`` of out: b slots,
    accumulators, output tiles and bias columns, plus its rows of a resident when they fit in
    ``cfg.local_sram_bytes``, else ``depth`` a tiles per row tile. Allocation granules included."""
    tm = min(rows, cfg.matmul_max_m)
    nb, al = ep.weights, cfg.sram_alignment
    n_acc = min(2, ceil_div(cols, t.tn))
    fixed = (
        nb * t.depth * sum(_aligned(t.tk * cw * esz, al) for _, cw in tiles(t.tn, t.chunk(cfg)))
        + nb * n_acc * _aligned(rows * t.tn * 4, al)
        + 2 * _aligned(tm * t.tn * out_esz, al)
        + (_aligned(cols * esz, al) if ep.bias else 0)
    )
    resident = fixed + _aligned(rows * kk * esz, al)
    if resident <= cfg.local_sram_bytes:
        return True, resident
    return False, fixed + t.depth * ceil_div(rows, tm) * _aligned(tm * t.tk * esz, al)


def footprint(cfg, m, k, n, t: Tiling, esz: int, out_esz: int, ep: Epilogue = PLAIN) -> int:
    """Local SRAM (bytes) the busiest engine allocates."""
    mp, np_ = t.blocks(cfg, m, n)
    return _layout(cfg, mp, k, np_, t, esz, out_esz, ep)[1]


def _fits(cfg, m, k, n, t: Tiling, esz: int, out_esz: int, ep: Epilogue = PLAIN) -> bool:
    return footprint(cfg, m, k, n, t, esz, out_esz, ep) <= cfg.local_sram_bytes


def _passes(total: int, step: int, piece: int, unit: int) -> tuple[int, int]:
    """Steps of ``step`` over ``total``, each cut into pieces of ``piece``: (sum over the pieces
    of ceil(length / unit), number of pieces)."""

    def one(length):
        full, rest = divmod(length, piece)
        return full * ceil_div(piece, unit) + (ceil_div(rest, unit) if rest else 0), full + (rest > 0)

    full, rest = divmod(total, step)
    p1, c1 = one(step)
    p2, c2 = one(rest) if rest else (0, 0)
    return full * p1 + p2, full * c1 + c2


def _last(total: int, step: int, piece: int) -> int:
    """Length of the last piece of the last step."""
    last_step = total - (ceil_div(total, step) - 1) * step
    return last_step - (ceil_div(last_step, piece) - 1) * piece


@dataclass(frozen=True)
class _Shape:
    """What the estimate needs besides the tiling."""

    m: int
    k: int
    n: int
    esz: int
    out_esz: int
    ep: Epilogue
    a_on_chip: bool
    out_on_chip: bool


def _estimate(cfg, s: _Shape, t: Tiling) -> tuple[float, int]:
    """(rough cycles, instructions) of a tiling: the slowest of the matrix unit, DRAM, the
    queues and the DMA latency per k-step, plus the start (the first tiles' way in) and the
    drain (the last chunk's matmul, epilogue and store), plus a host-time charge of 1 % of the
    run per 10,000 instructions (finer tiles must earn their planning time)."""
    m, k, n, esz, ep = s.m, s.k, s.n, s.esz, s.ep
    nb, dram, qr = ep.weights, cfg.dram_bytes_per_cycle, cfg.dma_queue_bytes_per_cycle
    mp, np_ = t.blocks(cfg, m, n)
    engines = t.gm * t.gn
    tm = min(mp, cfg.matmul_max_m)
    m_tiles = list(tiles(mp, tm))
    n_mt, rows = len(m_tiles), sum(max(rl, cfg.mac_rows) for _, rl in m_tiles)
    tc, kc = t.chunk(cfg), t.piece
    panels, n_k = ceil_div(np_, t.tn), ceil_div(k, t.tk)
    compute = nb * rows * _passes(k, t.tk, kc, cfg.mac_rows)[0] * _passes(np_, t.tn, tc, cfg.mac_cols)[0]
    resident = _layout(cfg, mp, k, np_, t, esz, s.out_esz, ep)[0]
    staged = t.stage_a or t.stage_b or s.a_on_chip
    # DRAM: a once when staged (or not at all when on chip), b once when staged, out once.
    a_reads = 0 if s.a_on_chip else (1 if t.stage_a else t.gn)
    out_bytes = 0 if s.out_on_chip else m * n * s.out_esz
    memory = ((m * k * a_reads + nb * k * n * (1 if t.stage_b else t.gm)) * esz + out_bytes) / dram
    # Queues: an engine's loads and stores on its share of them, dealt evenly or weights on one
    # and a and stores on another (see _queue). A queue keeps dma_outstanding descriptors in
    # flight, each paying its latency: small descriptors move slower than the queue's rate.
    pooled = t.stage_queues if t.stage_a or t.stage_b else 0
    n_own = len(_queue_plan(cfg.dma_queues, engines, pooled)[1][0])
    spread = _spread(t, n_own)
    own = max(1.0, (cfg.dma_queues - pooled) / engines) if spread else 1.0
    lat = cfg.dma_sram_latency if t.stage_b else cfg.dma_dram_latency
    lat_a = cfg.dma_sram_latency if staged else cfg.dma_dram_latency
    qb = _queue_rate(cfg, kc * tc * esz, lat)
    qa = _queue_rate(cfg, min(tm, mp) * kc * esz, lat_a)
    a_local = mp * k * esz * (1 if resident else panels)
    b_local, out_local = nb * k * np_ * esz, mp * np_ * s.out_esz
    if spread:
        queues = (a_local / qa + b_local / qb + out_local / qr) / own
    else:
        queues = max(b_local / qb, a_local / qa + out_local / qr)
    # A k-step's loads are issued while the previous one computes: latency and transfer of a
    # step at most one step's matmuls. Weights come from DRAM (sharing it) unless staged.
    rate = own * qb if t.stage_b else min(own * qb, dram / engines)
    step_bytes = (0 if resident else mp * t.tk * esz) + nb * t.tk * t.tn * esz
    per_step = panels * n_k * (lat + step_bytes / rate)
    steady = max(compute, memory, queues, per_step)
    if pooled:
        staged_bytes = (m * k if t.stage_a else 0) + (nb * k * n if t.stage_b else 0)
        steady = max(steady, staged_bytes * esz / (pooled * qr))
    if resident and panels > 1:  # the first panel loads (and stages) all of a
        a_in = max(m * k * esz / dram if t.stage_a else 0.0, a_local / (own * qa))
        steady = max(steady, a_in + compute * (panels - 1) / panels)
    # Start: the first piece of a and chunk of b, through shared SRAM when staged.
    kc0, tc0 = min(kc, k), min(tc, np_)
    a0, b0 = mp * kc0 * esz, nb * kc0 * tc0 * esz
    first = max(a0, b0) / qr if own >= 2 else (a0 + b0) / qr
    if staged:
        stage0 = ((m * kc0 if t.stage_a else 0) + (nb * min(t.tk, k) * tc0 * t.gn if t.stage_b else 0)) * esz
        start = cfg.dma_dram_latency + stage0 / dram + cfg.dma_sram_latency + first
    else:
        start = cfg.dma_dram_latency + max(engines * (a0 + b0) / dram, first)
    # Drain: the last chunk's matmuls, epilogue and store, and whatever stores of the last
    # panel the last k-step's matmuls do not cover.
    k_last = k - (n_k - 1) * t.tk
    kl, cl = _last(k_last, kc, kc), _last(np_ - (panels - 1) * t.tn, tc, tc)
    mm_last = nb * ceil_div(kl, cfg.mac_rows) * ceil_div(cl, cfg.mac_cols) * rows
    lanes, lat_v = (
        (cfg.sfu_lanes, cfg.sfu_latency) if ep.activation else (cfg.vector_lanes, cfg.vector_latency)
    )
    out_rate = min(cfg.shared_sram_bytes_per_cycle if s.out_on_chip else dram, engines * qr)
    store = (
        cfg.dma_sram_latency if s.out_on_chip else cfg.dma_dram_latency
    ) + engines * mp * cl * s.out_esz / out_rate
    last_panel = np_ - (panels - 1) * t.tn
    last_step = compute / panels * k_last / k
    backlog = engines * mp * last_panel * s.out_esz / out_rate - last_step
    drain = mm_last + n_mt * (tm * cl / lanes + lat_v) + store + max(0.0, backlog)
    # Instructions: per engine, (chunk, piece) units, each a b descriptor and a matmul per
    # row tile; a descriptors; epilogues and stores; staging descriptors.
    units = _passes(k, t.tk, kc, k)[1] * _passes(np_, t.tn, tc, np_)[1]
    p_step = ceil_div(t.tk, kc)
    a_desc = (ceil_div(k, kc) if resident else panels * ceil_div(k, kc)) * n_mt
    outs = _passes(np_, t.tn, tc, np_)[1] * n_mt
    instrs = engines * (units * nb * (n_mt + 1) + a_desc + outs * 2)
    if staged:
        nq = max(1, pooled or cfg.dma_queues)
        instrs += nq * ((ceil_div(k, kc) if t.stage_a else 0) + (nb * units // p_step if t.stage_b else 0))
    total = steady + start + drain + panels  # ties: fewer panels
    return total + total * instrs * 1e-6, instrs


SPLIT_BYTES = 32 << 10  # loads larger than this are split over the engine's queues
TRIALS = 4  # candidates scheduled per shape, the best estimates first
TRIAL_BUDGET = 30_000  # instructions scheduled per shape (a first trial always runs)


def choose_tiling(
    cfg,
    m: int,
    k: int,
    n: int,
    dtype: str = "bf16",
    out_dtype: str = "bf16",
    depth: int = 2,
    *,
    epilogue: Epilogue = PLAIN,
    a_on_chip: bool = False,
    out_on_chip: bool = False,
) -> Tiling:
    """Pick the engine grid and tiles: rank candidates by a cost estimate, then schedule the
    best few (no values, trace only) and keep the fastest. Cached per shape.

    ``cfg`` may be a chip whose SRAM sizes were cut to the budget left for this program.
    ``a_on_chip``: a already sits in shared SRAM (not staged, not read from DRAM);
    ``out_on_chip``: out goes to shared SRAM."""
    return _choose(cfg, m, k, n, dtype, out_dtype, depth, epilogue, a_on_chip, out_on_chip)


@functools.lru_cache(maxsize=512)
def _choose(cfg, m, k, n, dtype, out_dtype, depth, epilogue, a_on_chip, out_on_chip) -> Tiling:
    esz, out_esz = DTYPE_BYTES[dtype], DTYPE_BYTES[out_dtype]
    shape = _Shape(m, k, n, esz, out_esz, epilogue, a_on_chip, out_on_chip)
    cands = [(*_estimate(cfg, shape, t), t) for t in _candidates(cfg, shape, depth)]
    if not cands:
        raise KernelError(
            f"matmul: no tiling of (M, K, N) = ({m}, {k}, {n}) with {epilogue.weights} weight(s) fits "
            f"{cfg.local_sram_bytes} B of local SRAM on {cfg.name!r}"
        )
    cands.sort(key=lambda c: c[0])
    best, spent = None, 0
    for _, instrs, t in cands[:TRIALS]:
        if best is not None and spent + instrs > TRIAL_BUDGET:
            continue
        spent += instrs
        cycles = _trial(cfg, m, k, n, dtype, out_dtype, t, epilogue, a_on_chip, out_on_chip)
        if best is None or cycles < best[0]:
            best = (cycles, t)
    return best[1]


def _candidates(cfg, s: _Shape, depth: int):
    """Tilings that fit local SRAM: every engine grid (columns split in MAC widths, or evenly);
    steps of powers of two of the MAC rows; panels of powers of two of the MAC columns, in
    chunks of 1, 2 or 4 MAC widths (or whole) and pieces of 1 or 2 MAC heights (or whole).
    Sizes are balanced so that the last tile is not a sliver."""
    m, k, n, esz, nb = s.m, s.k, s.n, s.esz, s.ep.weights
    mr, mc, cap = cfg.mac_rows, cfg.mac_cols, cfg.shared_sram_bytes
    col_blocks = ceil_div(n, mc)
    # Queues that saturate DRAM between them: kept for staging when b is staged.
    n_stage = min(
        cfg.dma_queues - 1, ceil_div(int(cfg.dram_bytes_per_cycle), int(cfg.dma_queue_bytes_per_cycle))
    )
    grids = {(gm, min(cfg.num_engines // gm, col_blocks)) for gm in range(1, min(cfg.num_engines, m) + 1)}
    tks = sorted({_balanced(k, x, mr) for x in _pow2_sizes(mr, min(k, cfg.matmul_max_k))})
    for gm, gn in sorted(grids):
        widths = {Tiling(gm, gn, 1, 1, even=e).blocks(cfg, m, n)[1]: e for e in (True, False)}
        for tk in tks:
            # Stage what several engines read, while it fits in shared SRAM (a first: smaller).
            stage_a = (
                not s.a_on_chip
                and gn > 1
                and stage_bytes(cfg, m, k, n, Tiling(gm, gn, tk, 1, 1, True), esz) <= cap
            )
            stage_b = (
                gm > 1 and stage_bytes(cfg, m, k, n, Tiling(gm, gn, tk, 1, 1, stage_a, True), esz, nb) <= cap
            )
            sq = n_stage if stage_b else 0
            ahead = 4 if stage_a or stage_b else 0
            # One buffer (depth 1) holds one whole tile: its loads wait for its matmuls.
            kcs = {_balanced(tk, x, mr) for x in (mr, 2 * mr) if x < tk and depth > 1} | {0}
            for np_, even in widths.items():
                # Panels wider than a matmul (in chunks) take two or more buffers.
                top = np_ if depth > 1 else min(np_, cfg.matmul_max_n)
                for tn in sorted({_balanced(np_, x, mc) for x in _pow2_sizes(mc, top)}):
                    tcs = {
                        _balanced(tn, x, mc) for x in (mc, 2 * mc, 4 * mc) if x < min(tn, cfg.matmul_max_n)
                    }
                    for tc in sorted(tcs | {0}) if depth > 1 else (0,):
                        for kc in sorted(kcs):
                            t = Tiling(gm, gn, tk, tn, depth, stage_a, stage_b, tc, kc, even, sq, ahead)
                            if _fits(cfg, m, k, n, t, esz, s.out_esz, s.ep):
                                yield t


def _pow2_sizes(unit: int, limit: int):
    s = unit
    while s < limit:
        yield s
        s *= 2
    yield limit


def _trial(cfg, m, k, n, dtype, out_dtype, t: Tiling, ep=PLAIN, a_on_chip=False, out_on_chip=False) -> float:
    from npu_emulator.timing import schedule

    ctx = KernelContext("matmul-trial", cfg, execute=False, dtype=dtype)
    a = Buffer("a", SHARED if a_on_chip else DRAM, (m, k), dtype, 0, 0)
    bs = tuple(Buffer(f"b{j}", DRAM, (k, n), dtype, 0, 0) for j in range(ep.weights))
    bias = Buffer("bias", DRAM, (n,), dtype, 0, 0) if ep.bias else None
    out = Buffer("out", SHARED if out_on_chip else DRAM, (m, n), out_dtype, 0, 0)
    interleave(build_job(ctx, Job(a, bs, out, bias, ep), t).programs)
    return schedule(ctx.stream(), cfg).total


# ------------------------------------------------------------------------- the program


@dataclass
class Job:
    """One tiled matmul with its epilogue: ``out = epilogue(a @ bs[0] [, a @ bs[1]])``.

    a (M, K) in DRAM (staged to shared SRAM when the tiling says so) or already in shared SRAM;
    bs: 1 or 2 (gated) weights (K, N) in DRAM; out (M, N) in DRAM or shared SRAM; bias (N,) in
    DRAM or None."""

    a: object
    bs: tuple
    out: object
    bias: object = None
    ep: Epilogue = PLAIN
    prefix: str = ""  # names of this job's buffers (several jobs in one kernel)


@dataclass
class Built:
    programs: list  # one generator per engine; each step emits one k-step
    local: list  # the local SRAM buffers the programs use (free once the last step is emitted)
    shared: list  # shared SRAM the job staged operands into


def matmul_emit(
    k, a, b, *, activation: str | None = None, out_dtype=None, depth: int = 2, tiling: Tiling | None = None
):
    return _emit_linear(k, a, b, None, activation, out_dtype, depth, tiling)


def linear_emit(
    k,
    a,
    b,
    bias,
    *,
    activation: str | None = None,
    out_dtype=None,
    depth: int = 2,
    tiling: Tiling | None = None,
):
    if bias.shape != (b.shape[1],):
        raise KernelError(f"linear: bias {bias.shape} must be ({b.shape[1]},) for b {b.shape}")
    if bias.dtype != b.dtype:
        raise KernelError(f"linear: bias is {bias.dtype} and b is {b.dtype}")
    return _emit_linear(k, a, b, bias, activation, out_dtype, depth, tiling)


def _emit_linear(k, a, b, bias, activation, out_dtype, depth, tiling):
    (m, kk), (kk2, n) = a.shape, b.shape
    if kk != kk2:
        raise KernelError(f"matmul: a {a.shape} and b {b.shape} do not chain")
    if a.dtype != b.dtype:
        raise KernelError(f"matmul: a is {a.dtype} and b is {b.dtype}")
    if depth < 1:
        raise KernelError(f"matmul: depth must be >= 1, got {depth}")
    check_activation(activation)
    out_dtype = out_dtype or k.dtype
    ep = Epilogue(bias=bias is not None, activation=activation)
    t = tiling or choose_tiling(k.config, m, kk, n, a.dtype, out_dtype, depth, epilogue=ep)
    out = k.output((m, n), out_dtype, name="out")
    interleave(build_job(k, Job(a, (b,), out, bias, ep), t).programs)
    return out


def check_activation(activation) -> None:
    if activation is not None and activation not in SFU:
        raise KernelError(f"unknown activation {activation!r}; the SFU has {sorted(SFU)}")


class _Stager:
    """Copies a DRAM operand into shared SRAM one unit at a time, on first request.

    ``axis`` is the operand's contraction axis (1 for a, 0 for b). The copy is one shared
    buffer per k-step (short access logs keep planning fast). A unit is a range of the
    contraction axis times ranges of the other axis (all rows of a; for b, one chunk of columns
    in every engine column block). It is split along the other axis into about one piece per
    staging queue, dealt round-robin over them, so the pieces move in parallel."""

    def __init__(self, k, src, axis: int, tk: int, name: str, queues):
        self.k, self.src, self.axis, self.tk, self.queues = k, src, axis, tk, queues
        self.parts = []
        for i, (_, kl) in enumerate(tiles(src.shape[axis], tk)):
            shape = (src.shape[0], kl) if axis == 1 else (kl, src.shape[1])
            self.parts.append(k.alloc(shape, src.dtype, shared=True, name=f"{name}{i}"))
        self.done = set()
        self.next_q = 0

    def view(self, k0: int, kl: int, other: slice):
        """The staged copy of the operand's ``[other, k0 : k0 + kl]`` (within one k-step)."""
        i = k0 // self.tk
        ks = slice(k0 - i * self.tk, k0 - i * self.tk + kl)
        return self.parts[i][other, ks] if self.axis == 1 else self.parts[i][ks, other]

    def ensure(self, key, k0: int, kl: int, ranges) -> None:
        if key in self.done:
            return
        self.done.add(key)
        k, nq = self.k, len(self.queues)
        total = sum(ol for _, ol in ranges)
        for r0, rl in ranges:
            parts = max(1, min(rl, round(nq * rl / total)))
            for o0, ol in tiles(rl, ceil_div(rl, parts)):
                other = slice(r0 + o0, r0 + o0 + ol)
                src = self.src[other, k0 : k0 + kl] if self.axis == 1 else self.src[k0 : k0 + kl, other]
                k.dma(self.view(k0, kl, other), src, queue=self.queues[self.next_q])
                self.next_q = (self.next_q + 1) % nq


def stage_bytes(cfg, m: int, k: int, n: int, t: Tiling, esz: int, weights: int = 1) -> int:
    """Shared SRAM (bytes) a tiling's staged operands take: one buffer per k-step each."""
    al, total = cfg.sram_alignment, 0
    for _, kl in tiles(k, t.tk):
        total += (_aligned(m * kl * esz, al) if t.stage_a else 0) + (
            weights * _aligned(kl * n * esz, al) if t.stage_b else 0
        )
    return total


def build_job(k, job: Job, t: Tiling, cfg=None) -> Built:
    """Allocate and return the engines' programs of one job (emitted as they are stepped).

    ``cfg``: the chip with the SRAM budget this job may use (default: the whole chip); the
    engines decide from it whether their rows of a stay resident."""
    cfg = cfg or k.config
    a, bs = job.a, job.bs
    m, n = a.shape[0], bs[0].shape[1]
    mp, np_ = t.blocks(cfg, m, n)
    p = job.prefix
    staging = t.stage_a or t.stage_b
    stage_q, pools = _queue_plan(k.config.dma_queues, t.gm * t.gn, t.stage_queues if staging else 0)
    stage_a = _Stager(k, a, 1, t.tk, f"{p}a_shared", stage_q) if t.stage_a else None
    stage_bs = [
        _Stager(k, b, 0, t.tk, f"{p}b_shared" if j == 0 else f"{p}b{j}_shared", stage_q)
        if t.stage_b
        else None
        for j, b in enumerate(bs)
    ]
    steps = _steps(cfg, t, a.shape[1], np_)
    programs, local, first = [], [], None
    engine = 0
    for gi in range(t.gm):
        for gj in range(t.gn):
            m0, m1 = gi * mp, min(m, (gi + 1) * mp)
            n0, n1 = gj * np_, min(n, (gj + 1) * np_)
            if m0 < m1 and n0 < n1:
                prog = _EngineProgram(
                    k, cfg, engine, job, (stage_a, stage_bs), (m0, m1), (n0, n1), t, pools[engine], steps
                )
                programs.append(prog.steps())
                local += prog.buffers
                first = first or prog
            engine += 1
    if staging and t.ahead:
        # Staging runs ahead of the engines' loads, issued after every engine's descriptors
        # of a step (the queues serve in order: prefetches behind the loads in use).
        programs.append(_prefetch(first, t.ahead))
    return Built(programs, local, [b for s in (stage_a, *stage_bs) if s for b in s.parts])


def _spread(t: Tiling, n_own: int) -> bool:
    """Whether an engine deals every descriptor over its queues in turn: when it shares them
    with other engines (staging has its own), or has three or more (else weights take one
    queue, a and the stores the other)."""
    return bool(t.stage_queues and (t.stage_a or t.stage_b)) or n_own >= 3


def _queue_rate(cfg, nbytes: float, latency: int) -> float:
    """Bytes per cycle one queue moves in descriptors of ``nbytes``: ``dma_outstanding`` of them
    in flight, each waiting its latency, the data phases in turn at the queue's rate."""
    nbytes = max(1.0, nbytes)
    per = latency + nbytes / cfg.dma_queue_bytes_per_cycle
    return min(cfg.dma_queue_bytes_per_cycle, cfg.dma_outstanding * nbytes / per)


def _queue_plan(nq: int, engines: int, n_stage: int):
    """(staging queues, each engine's queues in the order it takes them).

    ``n_stage`` > 0 dedicates the last ``n_stage`` queues to staging and shares the rest out
    in equal groups (g engines on q queues, g / q = engines / the rest), each engine starting
    at its own turn. Otherwise every engine owns ``nq / engines`` queues (at least one) and
    staging uses them all."""
    rest = nq - n_stage
    if n_stage and rest >= 1:
        g = math.gcd(engines, rest)
        per_group, q_group = engines // g, rest // g
        pools = []
        for e in range(engines):
            qs = list(range(e // per_group * q_group, (e // per_group + 1) * q_group))
            turn = (e % per_group) * q_group // per_group
            pools.append(qs[turn:] + qs[:turn])
        return list(range(rest, nq)), pools
    per = max(1, nq // engines)
    return list(range(nq)), [[(e * per + i) % nq for i in range(per)] for e in range(engines)]


def _prefetch(prog, ahead: int):
    """Stage the ``ahead`` units after the last one ``prog`` loaded."""
    units = [u for step in prog.steps_ for u in step]
    while prog.loaded < len(units):
        for u in units[prog.loaded : prog.loaded + ahead]:
            prog.stage(u)
        yield


@dataclass(frozen=True)
class _Unit:
    """One chunk of one k-step of one panel: the grain of loads, matmuls and stores."""

    pi: int  # panel
    p0: int  # its first column (in the engine's block)
    ki: int  # k-step
    k0: int
    kl: int
    c0: int  # the chunk's first column (in the panel)
    cl: int
    wl: int  # the chunk's width in the widest engine block (its staging unit's)
    pieces: tuple  # (start, length) of its contraction pieces, relative to k0
    slot: int  # b (and a) buffer
    last_k: bool  # the chunk's accumulator is complete after this unit


def _wide(cfg, t: Tiling) -> int:
    """A panel in as few matmuls as the unit takes (balanced)."""
    return _balanced(t.tn, cfg.matmul_max_n, cfg.mac_cols) if t.tn > cfg.matmul_max_n else t.tn


def _steps(cfg, t: Tiling, kk: int, np_: int) -> list:
    """Units of the widest engine block, per k-step in program order: chunks of ``tc`` columns
    (whole panels when 0) cut into pieces of ``kc`` contraction rows."""
    out = []
    chunk, n_k = t.chunk(cfg), ceil_div(kk, t.tk)
    for pi, (p0, pl) in enumerate(tiles(np_, t.tn)):
        for ki, (k0, kl) in enumerate(tiles(kk, t.tk)):
            pieces = tuple(tiles(kl, t.piece))
            slot = len(out) % t.depth
            out.append(
                [
                    _Unit(pi, p0, ki, k0, kl, c0, cl, cl, pieces, slot, ki == n_k - 1)
                    for c0, cl in tiles(pl, chunk)
                ]
            )
    return out


class _EngineProgram:
    """One engine's share of a job: buffers allocated up front, ``steps()`` emits.

    Loop: panels of ``tn`` columns (one accumulator tile each, double-buffered) > k-steps of
    ``tk`` (one b tile buffer of ``depth``) > chunks > pieces > row tiles. Each (chunk, piece)
    of b is one descriptor and one matmul per row tile. The loads of a k-step are issued
    while the previous one computes (spread over its chunks); after the last k-step a chunk's
    epilogue and store follow its matmuls at once, overlapping the next chunk's."""

    def __init__(self, k, cfg, e, job: Job, stagers, mr, nr, t: Tiling, own, steps):
        self.k, self.e, self.job, self.t, self.own = k, e, job, t, own
        self.stage_a, self.stage_bs = stagers
        self.mr, self.nr = mr, nr
        a, bs, out, ep, p = job.a, job.bs, job.out, job.ep, job.prefix
        (m0, m1), (n0, n1) = mr, nr
        rows, kk, cols = m1 - m0, a.shape[1], n1 - n0
        self.np_ = t.blocks(cfg, a.shape[0], bs[0].shape[1])[1]
        self.tm = tm = min(rows, cfg.matmul_max_m)
        self.m_tiles = list(tiles(rows, tm))
        self.esz = esz = DTYPE_BYTES[a.dtype]
        self.resident_a = _layout(cfg, rows, kk, cols, t, esz, DTYPE_BYTES[out.dtype], ep)[0]
        self.buffers = []
        if self.resident_a:
            self.a_loc = self._alloc((rows, kk), a.dtype, f"{p}a_e{e}")
        else:
            self.a_slots = [
                [self._alloc((tm, t.tk), a.dtype, f"{p}a{s}_{i}_e{e}") for i in range(len(self.m_tiles))]
                for s in range(t.depth)
            ]
        names = ["b", "u"]  # the second (gated) weight: "up"
        # One buffer per chunk of a b tile (short access logs keep planning fast).
        chunks = list(tiles(t.tn, t.chunk(cfg)))
        self.b_slots = [
            [
                [
                    self._alloc((t.tk, cw), b.dtype, f"{p}{names[j]}{s}_{c}_e{e}")
                    for c, (_, cw) in enumerate(chunks)
                ]
                for s in range(t.depth)
            ]
            for j, b in enumerate(bs)
        ]
        self.accs = [
            [
                self._alloc((rows, t.tn), "fp32", f"{p}{'acc' if j == 0 else 'accu'}{s}_e{e}")
                for j in range(len(bs))
            ]
            for s in range(min(2, ceil_div(cols, t.tn)))
        ]
        self.outs = [self._alloc((tm, t.tn), out.dtype, f"{p}o{s}_e{e}") for s in range(2)]
        self.bias = self._alloc((1, cols), job.bias.dtype, f"{p}bias_e{e}") if ep.bias else None
        # The widest block's units, cut to this engine's columns.
        self.steps_ = [
            [replace(u, cl=min(u.cl, cols - u.p0 - u.c0)) for u in step if u.p0 + u.c0 < cols]
            for step in steps
        ]
        self.steps_ = [step for step in self.steps_ if step]
        self.staged = self.stage_a is not None or any(self.stage_bs)
        self.loaded = 0  # units loaded so far (the prefetch runs ahead of them)
        self.n_desc = 0

    def _alloc(self, shape, dtype, name):
        buf = self.k.alloc(shape, dtype, engine=self.e, name=name)
        self.buffers.append(buf)
        return buf

    def stage(self, unit: _Unit) -> None:
        """Stage what a unit reads: its pieces of a (in the first panel), its chunk of b."""
        if self.stage_a is not None and unit.pi == 0:
            for s0, sl in unit.pieces:
                self.stage_a.ensure(unit.k0 + s0, unit.k0 + s0, sl, [(0, self.job.a.shape[0])])
        if self.stage_bs[0] is not None:
            t, n, np_ = self.t, self.job.bs[0].shape[1], self.np_
            ranges = []
            for gj in range(t.gn):
                c0 = gj * np_ + unit.p0 + unit.c0
                c1 = min(n, (gj + 1) * np_, c0 + unit.wl)
                if c0 < c1:
                    ranges.append((c0, c1 - c0))
            for s in self.stage_bs:
                s.ensure((unit.k0, unit.p0 + unit.c0), unit.k0, unit.kl, ranges)

    def _queue(self, kind: str, j: int = 0) -> int:
        own = self.own
        if _spread(self.t, len(own)):  # every descriptor takes the next queue
            self.n_desc += 1
            return own[(self.n_desc - 1) % len(own)]
        if kind == "b":  # weights on the engine's last queues (one each when it has enough)
            return own[-1 - (j if len(own) > 2 else 0)]
        return own[0]

    def _load(self, unit: _Unit) -> list:
        """Issue a unit's descriptors; return its (a tiles per row tile, b tiles) per piece."""
        k = self.k
        (m0, _), (n0, _) = self.mr, self.nr
        if self.staged:
            self.stage(unit)
        self.loaded += 1
        cols = n0 + unit.p0 + unit.c0
        cl, k0 = unit.cl, unit.k0
        pieces = []
        ci = unit.c0 // self.t.chunk(self.k.config)
        for s0, sl in unit.pieces:
            bts = []
            for j, b in enumerate(self.job.bs):
                slot = self.b_slots[j][unit.slot][ci]
                for r0, rl in self._split(sl, cl * self.esz):
                    kr = k0 + s0 + r0
                    if self.stage_bs[j] is not None:
                        src = self.stage_bs[j].view(kr, rl, slice(cols, cols + cl))
                    else:
                        src = b[kr : kr + rl, cols : cols + cl]
                    k.dma(slot[s0 + r0 : s0 + r0 + rl, :cl], src, queue=self._queue("b", j))
                bts.append(slot[s0 : s0 + sl, :cl])
            ats = []
            ks = slice(k0 + s0, k0 + s0 + sl)
            for mi, (r0, rl) in enumerate(self.m_tiles):
                if self.resident_a:  # loaded in the first panel
                    at = self.a_loc[r0 : r0 + rl, ks]
                    if unit.pi == 0 and unit.c0 == 0:
                        for q0, ql in self._split(rl, sl * self.esz):
                            src = self._a_src(m0 + r0 + q0, ql, k0 + s0, sl)
                            k.dma(self.a_loc[r0 + q0 : r0 + q0 + ql, ks], src, queue=self._queue("a"))
                else:  # loaded with the first chunk of each k-step
                    at = self.a_slots[unit.slot][mi][:rl, s0 : s0 + sl]
                    if unit.c0 == 0:
                        for q0, ql in self._split(rl, sl * self.esz):
                            src = self._a_src(m0 + r0 + q0, ql, k0 + s0, sl)
                            dst = self.a_slots[unit.slot][mi][q0 : q0 + ql, s0 : s0 + sl]
                            k.dma(dst, src, queue=self._queue("a"))
                ats.append(at)
            pieces.append((ats, bts))
        return pieces

    def _a_src(self, r0: int, rl: int, k0: int, kl: int):
        """Rows of a to load: from its staged copy, or where it lies."""
        if self.stage_a is not None:
            return self.stage_a.view(k0, kl, slice(r0, r0 + rl))
        return self.job.a[r0 : r0 + rl, k0 : k0 + kl]

    def _split(self, rows: int, row_bytes: int):
        """Rows of one load, cut into up to one descriptor per queue of the engine's group
        when it is large (a descriptor moves at one queue's rate)."""
        parts = min(
            len(self.own) if self.t.stage_queues else 1, rows, ceil_div(rows * row_bytes, SPLIT_BYTES)
        )
        return tiles(rows, ceil_div(rows, max(1, parts)))

    def _compute(self, unit: _Unit, pieces) -> None:
        k, cfg, job = self.k, self.k.config, self.job
        (m0, _), (n0, _) = self.mr, self.nr
        accs = self.accs[unit.pi % len(self.accs)]
        c0, cl = unit.c0, unit.cl
        for si, (ats, bts) in enumerate(pieces):
            for (r0, rl), at in zip(self.m_tiles, ats):
                for acc, bt in zip(accs, bts):
                    k.matmul(acc[r0 : r0 + rl, c0 : c0 + cl], at, bt, accumulate=unit.ki > 0 or si > 0)
        if not unit.last_k:
            return
        # The chunk is finished: its epilogue and store overlap the next chunk's matmuls.
        cols, pc = n0 + unit.p0 + c0, unit.p0 + c0
        bias = self.bias[:, pc : pc + cl] if self.bias is not None else None
        for mi, (r0, rl) in enumerate(self.m_tiles):
            o = self.outs[(unit.pi * len(self.m_tiles) + mi) % 2][:, c0 : c0 + cl]
            # The vector unit and SFU take at most vector_max_elements per instruction.
            for s0, sl in tiles(rl, max(1, cfg.vector_max_elements // cl)):
                rs = slice(r0 + s0, r0 + s0 + sl)
                _epilogue(k, job.ep, o[s0 : s0 + sl], [acc[rs, c0 : c0 + cl] for acc in accs], bias)
            k.dma(job.out[m0 + r0 : m0 + r0 + rl, cols : cols + cl], o[:rl], queue=self._queue("out"))

    def steps(self):
        k, job = self.k, self.job
        (_, _), (n0, n1) = self.mr, self.nr
        if self.bias is not None:
            k.dma(self.bias, job.bias.region(n0, (1, n1 - n0), (n1 - n0, 1)), queue=self._queue("bias"))
        steps = self.steps_
        if self.t.depth == 1:  # one buffer: each unit's loads, then its matmuls
            for step in steps:
                for u in step:
                    self._compute(u, self._load(u))
                    yield
            return
        # The loads of k-step s + 1 are issued while k-step s computes, spread over its units.
        loaded = {}
        for u in steps[0]:
            loaded[u] = self._load(u)
            yield
        for s, step in enumerate(steps):
            nxt = steps[s + 1] if s + 1 < len(steps) else []
            for i, u in enumerate(step):
                for v in nxt[i * len(nxt) // len(step) : (i + 1) * len(nxt) // len(step)]:
                    loaded[v] = self._load(v)
                self._compute(u, loaded.pop(u))
                yield


def _epilogue(k, ep: Epilogue, o, accs, bias) -> None:
    """One chunk of a finished tile: fp32 accumulator(s) -> output dtype, in SRAM."""
    if ep.gated:
        if ep.activation or bias is not None:  # in place, fp32
            k.activation(ep.activation or "identity", accs[0], accs[0], bias=bias)
        k.vector("mul", o, accs[0], accs[1])
    elif ep.activation:
        k.activation(ep.activation, o, accs[0], bias=bias)
    elif bias is not None:
        k.vector("add", o, accs[0], bias)
    else:
        k.vector("copy", o, accs[0])  # the cast


matmul = Kernel("matmul", matmul_emit, matmul_fast, matmul_reference)
linear = Kernel("linear", linear_emit, linear_fast, linear_reference)

__all__ = [
    "matmul",
    "matmul_emit",
    "matmul_fast",
    "matmul_reference",
    "linear",
    "linear_emit",
    "linear_fast",
    "linear_reference",
    "gelu_tanh_reference",
    "choose_tiling",
    "Tiling",
    "Epilogue",
    "Job",
    "build_job",
    "footprint",
    "stage_bytes",
    "flops",
]
