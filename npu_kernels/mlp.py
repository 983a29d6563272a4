"""Fused MLP blocks: Gemma's GeGLU MLP and SigLIP's MLP, each one kernel, one instruction stream.

Kernels (inputs are DRAM tensors in the device dtype, weights pre-transposed to (in, out)):

* ``geglu_mlp(x, w_gate, w_up, w_down)``: x (T, D), w_gate (D, F), w_up (D, F), w_down (F, D)
  -> out (T, D) = ``(gelu_tanh(x @ w_gate) * (x @ w_up)) @ w_down`` (Gemma 3 text MLP).
* ``siglip_mlp(x, w1, b1, w2, b2)``: x (T, D), w1 (D, F), b1 (F,), w2 (F, D), b2 (D,)
  -> out (T, D) = ``gelu_tanh(x @ w1 + b1) @ w2 + b2`` (SigLIP vision-tower MLP).

No compile-time constants. Numerics: matmuls accumulate in fp32; the epilogue (bias, gelu_tanh
on the SFU, the gate * up product on the vector unit) works on the fp32 accumulators in SRAM;
the intermediate h (T, F) is stored once in the device dtype (bf16), the output likewise.

Plan (``plan_mlp``, cached per shape; both phases are the tiled program of
``npu_kernels/matmul.py``, see there for grids, staging and double buffering):

* up phase: for each column tile of F, the matching gate and up tiles (two weights, two fp32
  accumulators per engine) are computed side by side from the same x tile; the epilogue applies
  gelu_tanh in place (SFU) and multiplies by up (vector unit), writing h in bf16.
* h is kept in shared SRAM (not DRAM): the up phase writes its tiles there and the down
  projection's engines read them there (the one place every engine reaches). When T rows of
  (h + staged x) exceed half the shared SRAM, T is cut into equal passes that fit, two passes
  in flight (each pass re-reads the weights: compute-bound at such T, so it costs little);
  passes are also cut when an engine's accumulators for its rows would not fit local SRAM.
  Only if a pass would be thinner than the MAC array (mac_rows) does h go to DRAM scratch
  (``k.dram``) instead, written once and read back once.
* down phase: ``h @ w_down`` (+ b2) with its own engine grid and tiles.
* The local SRAM of each engine is split between the two phases (the up phase gets half, the
  down phase what the up phase leaves), so the down phase's buffers carry no dependency on the
  up phase's and its first weight tiles stream in as soon as the queues reach them; if no such
  split fits, the down phase reuses the up phase's SRAM. Engines' programs form one stream
  and the scheduler overlaps the phases wherever dependencies allow: a down-phase matmul waits
  only for the h tiles it reads (produced early, in column order). What remains at the phase
  boundary is the last up tile's epilogue and store, queued ahead of the first h load (on atom
  about 1-2 % of the 270M / 1B MLPs at T = 256, less for larger models).

SRAM: shared: h (rows, F) + staged operands; local per engine: the two phases' tiles
(``kernels.matmul.footprint``). FLOPs: geglu ``6 * T * D * F``, siglip ``4 * T * D * F``.
Compulsory DRAM bytes: x, weights (and biases) and out once each, in the device dtype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numba
import numpy as np

from npu_emulator import Kernel, KernelError, NPUConfig, as_stored
from npu_emulator.program import ceil_div, tiles

from . import hostmath
from .common import interleave
from .matmul import (
    DTYPE_BYTES,
    Epilogue,
    Job,
    Tiling,
    bias_activation_fast,
    build_job,
    choose_tiling,
    footprint,
    geglu_fast,
    geglu_into,
    gelu_tanh_reference,
    stage_bytes,
)

# ----------------------------------------------------------------- references and fast twins


def geglu_mlp_reference(x, w_gate, w_up, w_down, **_) -> np.ndarray:
    x = x.astype(np.float64)
    h = gelu_tanh_reference(x @ w_gate.astype(np.float64)) * (x @ w_up.astype(np.float64))
    return h @ w_down.astype(np.float64)


def siglip_mlp_reference(x, w1, b1, w2, b2, **_) -> np.ndarray:
    h = gelu_tanh_reference(x.astype(np.float64) @ w1.astype(np.float64) + b1.astype(np.float64))
    return h @ w2.astype(np.float64) + b2.astype(np.float64)


STRIP = 16  # columns of gate and up computed, then activated, while they are in L1


@numba.njit(parallel=True, cache=True)
def _geglu_columns(a, wg, wu, h, block, bf16):
    """h = gelu_tanh(a @ wg.T) * (a @ wu.T), rounded to bf16 when ``bf16`` (``as_stored``):
    blocks of ``block`` columns in parallel, each product and the GeGLU of a block on one
    thread (hostmath's products, ``geglu_into`` as ``geglu_fast``: the same bits, one fork)."""
    n = wg.shape[0]
    g = np.empty_like(h)
    u = np.empty_like(h)
    for b in numba.prange((n + block - 1) // block):
        for n0 in range(b * block, min(n, (b + 1) * block), STRIP):
            n1 = min(n, (b + 1) * block, n0 + STRIP)
            hostmath._mm_columns(a, wg, g, n0, n1)
            hostmath._mm_columns(a, wu, u, n0, n1)
            geglu_into(g, u, h, n0, n1, bf16)


def geglu_mlp_fast(x, w_gate, w_up, w_down, *, numerics: str = "fp32", **_) -> np.ndarray:
    if numerics not in ("bf16", "fp32"):
        raise ValueError(f"numerics must be 'bf16' or 'fp32', got {numerics!r}")
    a = np.ascontiguousarray(x, dtype=np.float32)
    wg, wu = (hostmath._held(np.ascontiguousarray(w.T)) for w in (w_gate, w_up))
    if a.ndim != 2 or wg.dtype != wu.dtype or wg.shape != wu.shape or a.shape[1] != wg.shape[1]:
        g, u = hostmath.matmul_pair(x, w_gate, w_up)  # (which also refuses what does not chain)
        h = as_stored(geglu_fast(g, u), numerics)  # the tiled program keeps h in the device dtype
        return hostmath.matmul(h, w_down)
    h = np.empty((a.shape[0], wg.shape[0]), np.float32)
    cap = 4096 if a.shape[0] <= hostmath.SMALL_M else 256
    _geglu_columns(a, wg, wu, h, hostmath._block(wg.shape[0], hostmath.TILE_N, cap), numerics == "bf16")
    return hostmath.matmul(h, w_down)


def siglip_mlp_fast(x, w1, b1, w2, b2, *, numerics: str = "fp32", **_) -> np.ndarray:
    h = as_stored(bias_activation_fast(hostmath.matmul(x, w1), b1, "gelu_tanh"), numerics)
    return bias_activation_fast(hostmath.matmul(h, w2), b2, None)


def mlp_flops(t: int, d: int, f: int, gated: bool) -> int:
    return 2 * t * d * f * (3 if gated else 2)


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class MLPPlan:
    rows: int  # rows of x per pass
    h_shared: bool  # h in shared SRAM (else DRAM scratch)
    split_local: bool  # the phases own disjoint local SRAM (else the down phase reuses it)
    up: Tiling
    up_cfg: NPUConfig  # the chip cut to the up phase's SRAM budget
    down: Tiling
    down_cfg: NPUConfig


def _align_down(nbytes: int, alignment: int) -> int:
    return max(alignment, nbytes // alignment * alignment)


SLACK_GRANULES = 32  # allocation granules kept free for rounding between budgets


@functools.lru_cache(maxsize=256)
def plan_mlp(cfg, t: int, d: int, f: int, dtype: str, gated: bool, bias: bool, activation: str) -> MLPPlan:
    """Rows per pass, where h lives, and both phases' tilings with their SRAM budgets."""
    esz = DTYPE_BYTES[dtype]
    slack = SLACK_GRANULES * cfg.sram_alignment
    # Rows per pass: h and staged x of a pass in half the shared SRAM (two passes in flight).
    half = cfg.shared_sram_bytes // 2
    per_row = (f + d) * esz
    rows, h_shared = t, True
    if t * per_row + slack > half:
        rows = ceil_div(t, ceil_div(t * per_row, max(1, half - slack)))
        if rows < min(t, cfg.mac_rows):  # passes this thin would re-read the weights too often
            rows, h_shared = t, False
    while True:
        plan = _plan_pass(cfg, t, rows, d, f, dtype, h_shared, Epilogue(bias, activation, gated))
        if plan is not None:
            return plan
        if rows == 1:
            raise KernelError(
                f"mlp: no tiling of (T, D, F) = ({t}, {d}, {f}) fits {cfg.local_sram_bytes} B of local "
                f"SRAM on {cfg.name!r}"
            )
        # Fewer rows per pass: the accumulators of an engine's rows must fit its local SRAM.
        rows = ceil_div(t, ceil_div(t, ceil_div(rows, 2)))


def _plan_pass(cfg, t, rows, d, f, dtype, h_shared, ep_up) -> MLPPlan | None:
    esz, al = DTYPE_BYTES[dtype], cfg.sram_alignment
    slack = SLACK_GRANULES * al
    ep_down = Epilogue(bias=ep_up.bias)
    shared_pass = cfg.shared_sram_bytes if rows == t else cfg.shared_sram_bytes // 2
    h_bytes = rows * f * esz if h_shared else 0
    up_shared = _align_down(shared_pass - h_bytes - slack, al)
    # The down phase gets the local SRAM the up phase leaves (both live at once); if no split
    # fits, the down phase reuses the up phase's SRAM (it then waits for the up phase to end).
    for split in (0.5, None):
        up_local = _align_down(int(cfg.local_sram_bytes * (split or 1.0)), al)
        up_cfg = cfg.replace(local_sram_bytes=up_local, shared_sram_bytes=up_shared)
        try:
            up = choose_tiling(up_cfg, rows, d, f, dtype, dtype, 2, epilogue=ep_up, out_on_chip=h_shared)
        except KernelError:
            continue
        staged = stage_bytes(up_cfg, rows, d, f, up, esz, ep_up.weights)
        down_shared = _align_down(shared_pass - h_bytes - staged - 2 * slack, al)
        down_local = cfg.local_sram_bytes
        if split:
            down_local -= footprint(up_cfg, rows, d, f, up, esz, esz, ep_up) + slack
            if down_local <= slack:
                continue
        down_cfg = cfg.replace(local_sram_bytes=_align_down(down_local, al), shared_sram_bytes=down_shared)
        try:
            down = choose_tiling(down_cfg, rows, f, d, dtype, dtype, 2, epilogue=ep_down, a_on_chip=h_shared)
        except KernelError:
            continue
        return MLPPlan(rows, h_shared, split is not None, up, up_cfg, down, down_cfg)
    return None


# ------------------------------------------------------------------------- the program


def _free(k, bufs) -> None:
    for b in bufs:
        k.free(b)


def _mlp_emit(k, name, x, w1s, w2, b1, b2):
    gated = len(w1s) == 2
    if len(x.shape) != 2:
        raise KernelError(f"{name}: x must be (T, D), got {x.shape}")
    t, d = x.shape
    f = w2.shape[0]
    for role, w, shape in [*((f"w{j}", w, (d, f)) for j, w in enumerate(w1s)), ("w_down", w2, (f, d))]:
        if w.shape != shape:
            raise KernelError(f"{name}: {role} is {w.shape}, expected {shape} for x {x.shape}")
    for role, b, n in (("b1", b1, f), ("b2", b2, d)):
        if b is not None and b.shape != (n,):
            raise KernelError(f"{name}: {role} is {b.shape}, expected ({n},)")
    dtypes = {v.dtype for v in (x, *w1s, w2, b1, b2) if v is not None}
    if len(dtypes) != 1:
        raise KernelError(f"{name}: inputs mix dtypes {sorted(dtypes)}")
    plan = plan_mlp(k.config, t, d, f, x.dtype, gated, b1 is not None, "gelu_tanh")
    ep_up = Epilogue(bias=b1 is not None, activation="gelu_tanh", gated=gated)
    ep_down = Epilogue(bias=b2 is not None)
    out = k.output((t, d), x.dtype, name="out")
    pending: list = []  # the previous pass's buffers, freed once the next pass holds its own
    for p, (r0, rl) in enumerate(tiles(t, plan.rows)):
        tag = f"p{p}_" if plan.rows < t else ""
        if plan.h_shared:
            h = k.alloc((rl, f), x.dtype, shared=True, name=f"{tag}h")
        else:
            h = k.dram((rl, f), x.dtype, name=f"{tag}h")
        if not plan.split_local:  # no room for two passes' local SRAM: reuse it
            _free(k, pending)
            pending = []
        up = build_job(k, Job(x[r0 : r0 + rl], w1s, h, b1, ep_up, f"{tag}up_"), plan.up, plan.up_cfg)
        _free(k, pending)
        interleave(up.programs)
        if not plan.split_local:  # the down phase reuses the up phase's local SRAM
            _free(k, up.local)
            up.local = []
        down = Job(h, (w2,), out[r0 : r0 + rl], b2, ep_down, f"{tag}down_")
        down = build_job(k, down, plan.down, plan.down_cfg)
        _free(k, up.local + up.shared)
        interleave(down.programs)
        pending = down.local + down.shared + ([h] if plan.h_shared else [])
    return out


def geglu_mlp_emit(k, x, w_gate, w_up, w_down):
    return _mlp_emit(k, "geglu_mlp", x, (w_gate, w_up), w_down, None, None)


def siglip_mlp_emit(k, x, w1, b1, w2, b2):
    return _mlp_emit(k, "siglip_mlp", x, (w1,), w2, b1, b2)


geglu_mlp = Kernel("geglu_mlp", geglu_mlp_emit, geglu_mlp_fast, geglu_mlp_reference)
siglip_mlp = Kernel("siglip_mlp", siglip_mlp_emit, siglip_mlp_fast, siglip_mlp_reference)

__all__ = [
    "geglu_mlp",
    "geglu_mlp_emit",
    "geglu_mlp_fast",
    "geglu_mlp_reference",
    "siglip_mlp",
    "siglip_mlp_emit",
    "siglip_mlp_fast",
    "siglip_mlp_reference",
    "plan_mlp",
    "MLPPlan",
    "mlp_flops",
]
