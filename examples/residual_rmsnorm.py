"""Worked example: a fused residual add + Gemma RMSNorm, rows streamed over every engine.

    h = x + r                                      (the new residual stream, also an output)
    y = h * rsqrt(mean(h^2) + eps) * (1 + w)       (Gemma RMSNorm of h, fp32 math)

IO (DRAM): x, r (rows, D) and w (D,) in the device dtype -> h, y (rows, D) likewise. h passes
through a device-dtype SRAM tile before it is normalised, so under bf16 numerics y is the norm of
the rounded h: ``fast`` rounds it the same way (``as_stored``) and matches tile mode under both
numerics. Each engine takes an equal block of rows and streams it in tiles of ``tile_rows``
through ``depth`` slots (2 = double buffering), loading on one DMA queue of its own and storing
on another; ``interleave`` issues the engines' programs tile by tile. SRAM per engine: depth x
(x, r, h, y tiles) + an fp32 (tile_rows, D) scratch + (1 + w) in fp32. DRAM: 4 x rows x D + D
elements; bandwidth bound. ``tile_rows`` is autotuned per shape and chip.
"""

import numpy as np

from npu_emulator import NPU, Kernel, as_stored, tiles
from npu_kernels.common import interleave, queues, split


def residual_rmsnorm_reference(x, r, w, *, eps=1e-6, **_):
    h = x.astype(np.float64) + r
    return h, h / np.sqrt(np.mean(h**2, axis=-1, keepdims=True) + eps) * (1.0 + w.astype(np.float64))


def residual_rmsnorm_fast(x, r, w, *, eps=1e-6, numerics="fp32", **_):
    h = as_stored(x + r, numerics)  # h is normalised as its SRAM tile holds it
    inv = 1.0 / np.sqrt(np.mean(np.square(h), axis=-1, keepdims=True, dtype=np.float32) + np.float32(eps))
    return h, h * inv * (np.float32(1.0) + w)


def _engine(k, e, r0, rl, x, r, w, h_out, y_out, eps, tr, depth, shared_queues):
    """One engine's program: a generator that issues one tile of rows per step."""
    d = x.shape[1]
    q_in, q_out = (0, 1) if shared_queues else queues(k.config, e)
    w_t = k.alloc((1, d), w.dtype, engine=e, name=f"w_e{e}")
    w1 = k.alloc((1, d), "fp32", engine=e, name=f"w1_e{e}")
    k.dma(w_t, w.reshape(1, d), queue=q_in)
    k.vector("add", w1, w_t, 1.0)  # Gemma scales by (1 + w), in fp32
    slot = [
        {n: k.alloc((tr, d), engine=e, name=f"{n}{s}_e{e}") for n in ("x", "r", "h", "y")}
        for s in range(depth)
    ]
    sq = k.alloc((tr, d), "fp32", engine=e, name=f"sq_e{e}")
    ss = k.alloc((tr, 1), "fp32", engine=e, name=f"ss_e{e}")
    for i, (t0, tl) in enumerate(tiles(rl, tr)):
        s, rows = slot[i % depth], slice(r0 + t0, r0 + t0 + tl)
        xs, rs, hs, ys = (s[n][:tl] for n in ("x", "r", "h", "y"))
        k.dma(xs, x[rows], queue=q_in)
        k.dma(rs, r[rows], queue=q_in)
        k.vector("add", hs, xs, rs)  # rounded to the device dtype: the stored residual
        k.dma(h_out[rows], hs, queue=q_out)
        k.vector("square", sq[:tl], hs)
        k.reduce("sum", ss[:tl], sq[:tl])
        k.activation("rsqrt", ss[:tl], ss[:tl], scale=1.0 / d, bias=eps)  # rsqrt(mean(h^2) + eps)
        k.vector("mul", sq[:tl], hs, ss[:tl])
        k.vector("mul", ys, sq[:tl], w1)
        k.dma(y_out[rows], ys, queue=q_out)
        yield


def residual_rmsnorm_emit(
    k, x, r, w, *, eps=1e-6, tile_rows=None, engines=None, depth=2, shared_queues=False
):
    """x, r (rows, D), w (D,) -> h, y (rows, D). ``engines`` (default all), ``depth`` and
    ``shared_queues`` (every engine on queues 0 and 1) exist for the ablation below."""
    rows, d = x.shape
    h_out = k.output((rows, d), x.dtype, name="h")
    y_out = k.output((rows, d), x.dtype, name="y")
    blocks = split(rows, engines or k.config.num_engines)
    tr = tile_rows or max(1, min(k.config.vector_max_elements // d, blocks[0][1]))
    interleave(
        _engine(k, e, r0, rl, x, r, w, h_out, y_out, eps, tr, depth, shared_queues)
        for e, (r0, rl) in enumerate(blocks)
    )
    return h_out, y_out


def tile_rows_candidates(cfg, x, r, w, **consts):
    """Autotuning: the tallest tile the vector unit takes (fewest instructions), half of it
    (the pipeline fills sooner), and a quarter of an engine's rows (at least 4 tiles each)."""
    rows, d = x.shape
    per_engine = -(-rows // (consts.get("engines") or cfg.num_engines))
    tallest = max(1, min(cfg.vector_max_elements // d, per_engine))
    return [{"tile_rows": t} for t in sorted({tallest, -(-tallest // 2), min(tallest, -(-per_engine // 4))})]


residual_rmsnorm = Kernel(
    "residual_rmsnorm",
    residual_rmsnorm_emit,
    residual_rmsnorm_fast,
    residual_rmsnorm_reference,
    autotune=tile_rows_candidates,
)

if __name__ == "__main__":
    rng = np.random.default_rng(0)
    x, r = (rng.standard_normal((256, 640), dtype=np.float32) for _ in range(2))
    w = rng.standard_normal(640, dtype=np.float32) * 0.1
    npu = NPU("atom", mode="tile")  # every instruction executed and checked, on all 8 engines
    (h, y), report = npu.run(residual_rmsnorm, x, r, w)
    h_ref, y_ref = residual_rmsnorm_reference(x, r, w)
    print("max |y - reference| =", float(np.abs(y - y_ref).max()), "(bf16 inputs and outputs)")
    print(report)
    # The ablation: the same kernel at Gemma 3 4B's width, planned in fast mode (no values).
    plan = NPU("atom").plan
    sig = [((1024, 2560), "bf16"), ((1024, 2560), "bf16"), ((2560,), "bf16")]
    print(
        f"\n{'variant (1024 x 2560 on atom)':<36}{'cycles':>10}{'% of DRAM bound':>17}{'% of roofline':>15}  binding"
    )
    for label, consts in [
        ("all engines, own queues, depth 2", {}),
        ("one engine", {"engines": 1}),
        ("every engine on queues 0 and 1", {"shared_queues": True}),
        ("single buffering (depth 1)", {"depth": 1}),
    ]:
        rep = plan(residual_rmsnorm, sig, consts).report
        dram = 100 * rep.unit_bounds["dram"] / rep.cycles
        print(f"{label:<36}{rep.cycles:>10,}{dram:>16.1f}%{rep.pct_of_roofline:>14.1f}%  {rep.binding_unit}")
