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
  block j of ``out``.
* An operand that several engines read (a when gn > 1, b when gm > 1) is staged once into
  shared SRAM, k-tile by k-tile, each k-tile split over all DMA queues so it lands as early as
  possible; engines then pull their tiles from shared SRAM instead of each reading DRAM.
* Each engine keeps its rows of a resident in local SRAM (loaded on first use) when they fit,
  and streams b in (TK, TN) tiles through ``depth`` buffers (2 = double buffering: the DMA of
  tile i+1 overlaps the matmuls on tile i). Accumulators are double-buffered across column
  tiles so the epilogue and write-out of one overlaps the next one's matmuls.
* Engines' programs are interleaved step by step in program order, since a DMA queue serves its
  descriptors in order.

The same tiled program (``Job``, ``build_job``) also runs a *gated* pair of weights: two
accumulators per tile, ``act(a @ b0 [+ bias]) * (a @ b1)`` (GeGLU), with a read from shared
SRAM and the result written to shared SRAM: ``kernels/mlp.py`` chains two such jobs.

SRAM per engine: a rows ``Mp * K`` (or ``depth`` a tiles), ``depth`` b tiles ``TK x TN`` per
weight, two fp32 accumulators ``Mp x TN`` per weight, two output tiles ``TM x TN``, the bias
columns ``Np``; shared SRAM: the staged operands.
FLOPs: ``2 * M * K * N`` per weight. Compulsory DRAM bytes: ``(M*K + K*N + N) * elt + M*N *
out elt`` (the bias term for ``linear`` only).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numba
import numpy as np

from emulator import Kernel, KernelError
from emulator.memory import DRAM, SHARED, Buffer
from emulator.program import KernelContext, ceil_div, tiles
from emulator.units import SFU

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


@numba.njit(inline="always")
def _gelu32(v):
    inner = np.float32(SQRT_2_OVER_PI) * (v + np.float32(0.044715) * v * v * v)
    return np.float32(0.5) * v * (np.float32(1.0) + np.tanh(inner))


@numba.njit(parallel=True, cache=True)
def _bias_gelu_rows(y, bias, gelu):
    """In place: ``y[r, c] = gelu?(y[r, c] + bias[c])``, fp32, rows in parallel."""
    rows, cols = y.shape
    for r in numba.prange(rows):
        for c in range(cols):
            v = y[r, c] + bias[c]
            y[r, c] = _gelu32(v) if gelu else v


@numba.njit(parallel=True, cache=True)
def _geglu_rows(g, u, out):
    """``out = gelu_tanh(g) * u``, fp32, rows in parallel."""
    rows, cols = g.shape
    for r in numba.prange(rows):
        for c in range(cols):
            out[r, c] = _gelu32(g[r, c]) * u[r, c]


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
    _geglu_rows(g, np.ascontiguousarray(u, dtype=np.float32), out)
    return out


def matmul_fast(a: np.ndarray, b: np.ndarray, *, activation: str | None = None, **_) -> np.ndarray:
    return bias_activation_fast(np.matmul(a, b, dtype=np.float32), None, activation)


def linear_fast(
    a: np.ndarray, b: np.ndarray, bias: np.ndarray, *, activation: str | None = None, **_
) -> np.ndarray:
    return bias_activation_fast(np.matmul(a, b, dtype=np.float32), bias, activation)


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


def _aligned(nbytes: int, alignment: int) -> int:
    """Bytes an allocation of ``nbytes`` takes (the allocator rounds up to its granule)."""
    return max(alignment, ceil_div(nbytes, alignment) * alignment)


def _layout(cfg, rows, kk, cols, t: Tiling, esz, out_esz, ep: Epilogue) -> tuple[bool, int]:
    """(a resident?, local SRAM bytes) of an engine owning ``rows`` x ``cols`` of out: b slots,
    accumulators, output tiles and bias columns, plus its rows of a resident when they fit in
    ``cfg.local_sram_bytes``, else ``depth`` a tiles. Allocation granules included."""
    tm = min(rows, cfg.matmul_max_m)
    nb, al = ep.weights, cfg.sram_alignment
    fixed = (
        nb * t.depth * _aligned(t.tk * t.tn * esz, al)
        + nb * 2 * _aligned(rows * t.tn * 4, al)
        + 2 * _aligned(tm * t.tn * out_esz, al)
        + (_aligned(cols * esz, al) if ep.bias else 0)
    )
    resident = fixed + _aligned(rows * kk * esz, al)
    if resident <= cfg.local_sram_bytes:
        return True, resident
    return False, fixed + t.depth * _aligned(tm * t.tk * esz, al)


def footprint(cfg, m, k, n, t: Tiling, esz: int, out_esz: int, ep: Epilogue = PLAIN) -> int:
    """Local SRAM (bytes) the busiest engine allocates."""
    mp, np_ = t.blocks(cfg, m, n)
    return _layout(cfg, mp, k, np_, t, esz, out_esz, ep)[1]


def _fits(cfg, m, k, n, t: Tiling, esz: int, out_esz: int, ep: Epilogue = PLAIN) -> bool:
    return footprint(cfg, m, k, n, t, esz, out_esz, ep) <= cfg.local_sram_bytes


def _estimate(cfg, m, k, n, t: Tiling, esz: int, ep: Epilogue = PLAIN, a_on_chip: bool = False) -> float:
    """Rough cycles: the slower of compute and DRAM, plus pipeline fill and drain."""
    nb = ep.weights
    mp, np_ = t.blocks(cfg, m, n)
    tm = min(mp, cfg.matmul_max_m)
    k_passes = sum(ceil_div(kl, cfg.mac_rows) for _, kl in tiles(k, t.tk))
    n_passes = sum(ceil_div(nl, cfg.mac_cols) for _, nl in tiles(np_, t.tn))
    m_rows = sum(max(ml, cfg.mac_rows) for _, ml in tiles(mp, tm))
    instrs = ceil_div(k, t.tk) * ceil_div(np_, t.tn) * ceil_div(mp, tm) * nb
    # Per-instruction overhead stands in for the DMA issue and dependency stalls of small tiles.
    compute = nb * k_passes * n_passes * m_rows + instrs * cfg.mac_fill_drain
    a_reads = 0 if a_on_chip else (1 if t.stage_a else t.gn)
    traffic = (m * k * a_reads + nb * k * n * (1 if t.stage_b else t.gm) + m * n) * esz
    memory = traffic / cfg.dram_bytes_per_cycle
    engines = t.gm * t.gn
    fill = engines * (nb * t.tk * t.tn + tm * t.tk) * esz / cfg.dram_bytes_per_cycle
    last_tn = np_ - (ceil_div(np_, t.tn) - 1) * t.tn  # the final column tile drains alone
    drain = engines * mp * last_tn * esz / cfg.dram_bytes_per_cycle + compute / instrs
    # One cycle per instruction over all engines breaks ties towards fewer, larger tiles
    # (and keeps tracing cheap).
    return max(compute, memory) + fill + drain + cfg.dma_dram_latency + instrs * engines


TRIALS = 10  # candidates scheduled per shape


@functools.lru_cache(maxsize=512)
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
    best few (no values, trace only) and keep the fastest.

    ``cfg`` may be a chip whose SRAM sizes were cut to the budget left for this program.
    ``a_on_chip``: a already sits in shared SRAM (not staged, not read from DRAM);
    ``out_on_chip``: out goes to shared SRAM."""
    esz, out_esz = DTYPE_BYTES[dtype], DTYPE_BYTES[out_dtype]
    nb = epilogue.weights
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
        al, cap = cfg.sram_alignment, cfg.shared_sram_bytes
        stage_a = not a_on_chip and gn > 1 and _aligned(m * k * esz, al) <= cap
        a_shared = _aligned(m * k * esz, al) if stage_a else 0
        stage_b = gm > 1 and a_shared + nb * _aligned(k * n * esz, al) <= cap
        for tk in tks:
            for tn in sorted(tns):
                t = Tiling(gm, gn, tk, tn, depth, stage_a, stage_b)
                if _fits(cfg, m, k, n, t, esz, out_esz, epilogue):
                    cands.append((_estimate(cfg, m, k, n, t, esz, epilogue, a_on_chip), t))
    if not cands:
        raise KernelError(
            f"matmul: no tiling of (M, K, N) = ({m}, {k}, {n}) with {nb} weight(s) fits "
            f"{cfg.local_sram_bytes} B of local SRAM on {cfg.name!r}"
        )
    cands.sort(key=lambda c: c[0])
    best = None
    trials = TRIALS if _instructions(cfg, m, k, n, cands[0][1], nb) < 20_000 else 3
    for _, t in cands[:trials]:
        cycles = _trial(cfg, m, k, n, dtype, out_dtype, t, epilogue, a_on_chip, out_on_chip)
        if best is None or cycles < best[0]:
            best = (cycles, t)
    return best[1]


def _instructions(cfg, m, k, n, t: Tiling, nb: int = 1) -> int:
    mp, np_ = t.blocks(cfg, m, n)
    per_engine = ceil_div(k, t.tk) * ceil_div(np_, t.tn) * (1 + 2 * ceil_div(mp, min(mp, cfg.matmul_max_m)))
    return per_engine * t.gm * t.gn * nb


def _pow2_sizes(unit: int, limit: int):
    s = unit
    while s < limit:
        yield s
        s *= 2
    yield limit


def _trial(cfg, m, k, n, dtype, out_dtype, t: Tiling, ep=PLAIN, a_on_chip=False, out_on_chip=False) -> float:
    from emulator.timing import schedule

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


def interleave(programs) -> None:
    """Run engines' programs step by step (program order is issue order per queue)."""
    programs = list(programs)
    while programs:
        programs = [p for p in programs if next(p, StopIteration) is not StopIteration]


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


def build_job(k, job: Job, t: Tiling, cfg=None) -> Built:
    """Allocate and return the engines' programs of one job (emitted as they are stepped).

    ``cfg``: the chip with the SRAM budget this job may use (default: the whole chip); the
    engines decide from it whether their rows of a stay resident."""
    cfg = cfg or k.config
    a, bs = job.a, job.bs
    m, n = a.shape[0], bs[0].shape[1]
    mp, np_ = t.blocks(cfg, m, n)
    p = job.prefix
    stage_a = _Stager(k, a, 1, t.tk, f"{p}a_shared") if t.stage_a else None
    stage_bs = [
        _Stager(k, b, 0, t.tk, f"{p}b_shared" if j == 0 else f"{p}b{j}_shared") if t.stage_b else None
        for j, b in enumerate(bs)
    ]
    per_engine = max(1, k.config.dma_queues // k.config.num_engines)
    programs, local = [], []
    engine = 0
    for gi in range(t.gm):
        for gj in range(t.gn):
            m0, m1 = gi * mp, min(m, (gi + 1) * mp)
            n0, n1 = gj * np_, min(n, (gj + 1) * np_)
            if m0 < m1 and n0 < n1:
                first = engine * per_engine
                q_a = first % k.config.dma_queues
                # Weights on the engine's last queues (one each when it has enough of them).
                q_bs = [
                    (first + per_engine - 1 - (j if per_engine > 2 else 0)) % k.config.dma_queues
                    for j in range(len(bs))
                ]
                prog = _EngineProgram(
                    k, cfg, engine, job, stage_a, stage_bs, (m0, m1), (n0, n1), t, q_a, q_bs
                )
                programs.append(prog.steps())
                local += prog.buffers
            engine += 1
    return Built(programs, local, [s.dst for s in (stage_a, *stage_bs) if s])


class _EngineProgram:
    """One engine's share of a job: buffers allocated up front, ``steps()`` emits."""

    def __init__(self, k, cfg, e, job: Job, stage_a, stage_bs, mr, nr, t: Tiling, q_a, q_bs):
        self.k, self.e, self.job, self.t = k, e, job, t
        self.stage_a, self.stage_bs = stage_a, stage_bs
        self.mr, self.nr, self.q_a, self.q_bs = mr, nr, q_a, q_bs
        a, bs, out, ep, p = job.a, job.bs, job.out, job.ep, job.prefix
        (m0, m1), (n0, n1) = mr, nr
        rows, kk = m1 - m0, a.shape[1]
        self.tm = tm = min(rows, cfg.matmul_max_m)
        esz = DTYPE_BYTES[a.dtype]
        self.resident_a = _layout(cfg, rows, kk, n1 - n0, t, esz, DTYPE_BYTES[out.dtype], ep)[0]
        self.buffers = []
        if self.resident_a:
            self.a_loc = self._alloc((rows, kk), a.dtype, f"{p}a_e{e}")
        else:
            self.a_slots = [self._alloc((tm, t.tk), a.dtype, f"{p}a{s}_e{e}") for s in range(t.depth)]
        names = ["b", "u"]  # the second (gated) weight: "up"
        self.b_slots = [
            [self._alloc((t.tk, t.tn), b.dtype, f"{p}{names[j]}{s}_e{e}") for s in range(t.depth)]
            for j, b in enumerate(bs)
        ]
        self.accs = [
            [
                self._alloc((rows, t.tn), "fp32", f"{p}{'acc' if j == 0 else 'accu'}{s}_e{e}")
                for j in range(len(bs))
            ]
            for s in range(2)
        ]
        self.outs = [self._alloc((tm, t.tn), out.dtype, f"{p}o{s}_e{e}") for s in range(2)]
        self.bias = self._alloc((1, n1 - n0), job.bias.dtype, f"{p}bias_e{e}") if ep.bias else None

    def _alloc(self, shape, dtype, name):
        buf = self.k.alloc(shape, dtype, engine=self.e, name=name)
        self.buffers.append(buf)
        return buf

    def steps(self):
        k, cfg, t, job = self.k, self.k.config, self.t, self.job
        (m0, m1), (n0, n1) = self.mr, self.nr
        q_a, q_bs = self.q_a, self.q_bs
        a, out = job.a, job.out
        rows, kk = m1 - m0, a.shape[1]
        m_tiles = list(tiles(rows, self.tm))
        src_a = self.stage_a.dst if self.stage_a else a
        src_bs = [s.dst if s else b for s, b in zip(self.stage_bs, job.bs)]
        stagers = [s for s in (self.stage_a, *self.stage_bs) if s]
        if self.bias is not None:
            k.dma(self.bias, job.bias.region(n0, (1, n1 - n0), (n1 - n0, 1)), queue=q_a)
        a_loaded = set()
        step = 0
        for ni, (c0, cl) in enumerate(tiles(n1 - n0, t.tn)):
            accs = self.accs[ni % 2]
            cols = slice(n0 + c0, n0 + c0 + cl)
            for ki, (k0, kl) in enumerate(tiles(kk, t.tk)):
                for stager in stagers:
                    stager.ensure(k0)
                bts = []
                for j, src_b in enumerate(src_bs):
                    bt = self.b_slots[j][step % t.depth][:kl, :cl]
                    k.dma(bt, src_b[k0 : k0 + kl, cols], queue=q_bs[j])
                    bts.append(bt)
                for r0, rl in m_tiles:
                    rows_a = slice(m0 + r0, m0 + r0 + rl)
                    if self.resident_a:
                        at = self.a_loc[r0 : r0 + rl, k0 : k0 + kl]
                        if (r0, k0) not in a_loaded:
                            k.dma(at, src_a[rows_a, k0 : k0 + kl], queue=q_a)
                            a_loaded.add((r0, k0))
                    else:
                        at = self.a_slots[step % t.depth][:rl, :kl]
                        k.dma(at, src_a[rows_a, k0 : k0 + kl], queue=q_a)
                    for acc, bt in zip(accs, bts):
                        k.matmul(acc[r0 : r0 + rl, :cl], at, bt, accumulate=ki > 0)
                step += 1
                yield
            bias = self.bias[:, c0 : c0 + cl] if self.bias is not None else None
            for mi, (r0, rl) in enumerate(m_tiles):
                o = self.outs[mi % 2]
                # The vector unit and SFU take at most vector_max_elements per instruction.
                for s0, sl in tiles(rl, max(1, cfg.vector_max_elements // cl)):
                    rs = slice(r0 + s0, r0 + s0 + sl)
                    _epilogue(k, job.ep, o[s0 : s0 + sl, :cl], [acc[rs, :cl] for acc in accs], bias)
                k.dma(out[m0 + r0 : m0 + r0 + rl, cols], o[:rl, :cl], queue=q_a)


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
    "interleave",
    "footprint",
    "flops",
]
