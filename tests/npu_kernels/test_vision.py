import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npu_emulator import NPU, TINY, KernelError, round_bf16
from npu_kernels.vision import (
    PATCH_MODES,
    PatchTiling,
    ProjectorTiling,
    choose_patch_tiling,
    choose_projector_tiling,
    im2col,
    mm_projector,
    mm_projector_reference,
    patch_embed,
    patch_embed_reference,
)
from tests.strategies import TINY4, arrays, chips, patch_shapes, projector_shapes, seeds

# On TINY4 engine grids, shared-SRAM staging and the pooling split run at test sizes.

U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
U_FP32 = 2.0**-24


def roofline_moved(rep, cfg):
    return max(rep.flops / cfg.peak_flops_per_cycle, rep.dram_bytes / cfg.dram_bytes_per_cycle)


def run_both(kernel, cfg, numerics, *inputs, **consts):
    outs, reports = [], []
    for mode in ("tile", "fast"):
        out, rep = NPU(cfg, mode=mode, numerics=numerics).run(kernel, *inputs, **consts)
        outs.append(out)
        reports.append(rep)
    return outs, reports


# ============================================================================ patch_embed


def patch_inputs(shape, seed, bf16=False):
    c, h, wd, p, d = shape
    n, kk = (h // p) * (wd // p), c * p * p
    xs = [
        arrays((c, h, wd), seed),
        arrays((kk, d), seed + 1, 0.3),
        arrays((d,), seed + 2),
        arrays((n, d), seed + 3),
    ]
    return [round_bf16(v) for v in xs] if bf16 else xs


def patch_magnitude(pixels, w, b, pos, p):
    return np.abs(im2col(pixels, p)).astype(np.float64) @ np.abs(w) + np.abs(b) + np.abs(pos)


def test_im2col_is_the_convolution_layout():
    """Row n = (i, j) of the grid, columns in the Conv2d weight's (c, ky, kx) order."""
    px = np.arange(2 * 6 * 9, dtype=np.float32).reshape(2, 6, 9)
    cols = im2col(px, 3)
    assert cols.shape == (2 * 3, 2 * 9)
    np.testing.assert_array_equal(cols[4], px[:, 3:6, 3:6].reshape(-1))  # i = 1, j = 1


@settings(max_examples=80, deadline=None)
@given(shape=patch_shapes(), seed=seeds, cfg=chips)
def test_patch_embed_fp32_both_modes_equal_numpy_and_each_other(shape, seed, cfg):
    c, h, wd, p, d = shape
    pixels, w, b, pos = patch_inputs(shape, seed)
    n, kk = pos.shape[0], w.shape[0]
    ref = patch_embed_reference(pixels, w, b, pos, patch=p)
    outs, (tile, fast) = run_both(patch_embed, cfg, "fp32", pixels, w, b, pos, patch=p)
    # fp32 sums of K products and two adds in any order: (K + 2) u32 of the magnitudes.
    tol = 2 * (kk + 2) * U_FP32 * patch_magnitude(pixels, w, b, pos, p) + 1e-30
    for out in outs:
        assert out.shape == (n, d)
        assert np.all(np.abs(out - ref) <= tol)
    assert tile == fast  # identical cycle reports: same stream, same schedule
    assert tile.flops == 2 * n * kk * d
    assert tile.cycles >= roofline_moved(tile, cfg)
    assert tile.bytes_by_path["local->dram"] == n * d * 2  # the output leaves once
    # im2col reads each pixel under a patch exactly once, and nothing else of the image.
    to_sram = tile.bytes_by_path.get("dram->local", 0) + tile.bytes_by_path.get("dram->shared", 0)
    assert to_sram >= (n * kk + n * d + d) * 2


@settings(max_examples=50, deadline=None)
@given(shape=patch_shapes(), seed=seeds, cfg=chips)
def test_patch_embed_bf16_within_bf16_tolerance(shape, seed, cfg):
    c, h, wd, p, d = shape
    pixels, w, b, pos = patch_inputs(shape, seed, bf16=True)
    ref = patch_embed_reference(pixels, w, b, pos, patch=p)  # on the bf16 inputs the device holds
    outs, _ = run_both(patch_embed, cfg, "bf16", pixels, w, b, pos, patch=p)
    kk = w.shape[0]
    # fp32 accumulation and epilogue as above, then one rounding of the output to bf16.
    tol = U_BF16 * np.abs(ref) + 2 * (kk + 2) * U_FP32 * patch_magnitude(pixels, w, b, pos, p) + 1e-30
    for out in outs:
        assert np.all(np.abs(out - ref) <= tol)
        np.testing.assert_array_equal(out, round_bf16(out))


@pytest.mark.parametrize(
    "mode, stage, cfg",
    list(itertools.product(PATCH_MODES, (False, True), (TINY, TINY4))),
    ids=lambda v: v.name if hasattr(v, "name") else str(v),
)
def test_patch_embed_every_plan_variant(mode, stage, cfg):
    """Each way of holding im2col and w (and staging w or not), on a shape that tiles M, N, K."""
    shape = (3, 47, 40, 5, 70)  # N = 9 x 8 = 72 > 64 rows, K = 75 > 64, D = 70 > 64
    c, h, wd, p, d = shape
    pixels, w, b, pos = patch_inputs(shape, 5)
    base = choose_patch_tiling(cfg, c, h, wd, p, d)
    t = PatchTiling(base.gm, base.gn, 16, base.tn, base.k_tiles, stage, mode)
    out, _ = NPU(cfg, mode="tile", numerics="fp32").run(patch_embed, pixels, w, b, pos, patch=p, tiling=t)
    ref = patch_embed_reference(pixels, w, b, pos, patch=p)
    assert np.all(np.abs(out - ref) <= 2 * 77 * U_FP32 * patch_magnitude(pixels, w, b, pos, p))


def test_patch_embed_rejects_mismatched_operands():
    npu = NPU(TINY)
    with pytest.raises(KernelError, match="C\\*p\\*p"):
        npu.plan(
            patch_embed,
            [((3, 8, 8), "bf16"), ((13, 4), "bf16"), ((4,), "bf16"), ((16, 4), "bf16")],
            {"patch": 2},
        )
    with pytest.raises(KernelError, match="pos"):
        npu.plan(
            patch_embed,
            [((3, 8, 8), "bf16"), ((12, 4), "bf16"), ((4,), "bf16"), ((15, 4), "bf16")],
            {"patch": 2},
        )


# =========================================================================== mm_projector


def projector_inputs(shape, seed, bf16=False, scale=2.0):
    g, pool, dv, dt = shape
    xs = [arrays((g * g, dv), seed, scale), arrays((dv,), seed + 1, 0.5), arrays((dv, dt), seed + 2, 0.2)]
    return [round_bf16(v) for v in xs] if bf16 else xs


def projector_magnitude(x, norm_w, w, pool):
    """(r * avgpool(|x|) * |1 + norm_w|) @ |w|, with r the reference's per-token scale
    rsqrt(mean(token^2) + eps): bounds every output, the error of each term of its sum, and
    the fp32 error of the window sums, which is relative to the sum of |x| (they may cancel)."""
    g, dv = int(np.sqrt(x.shape[0])), x.shape[1]
    gp = g // pool

    def pooled(v):
        return v.astype(np.float64).reshape(gp, pool, gp, pool, dv).mean(axis=(1, 3)).reshape(gp * gp, dv)

    r = 1.0 / np.sqrt(np.mean(pooled(x) ** 2, axis=-1, keepdims=True) + 1e-6)
    return (r * pooled(np.abs(x)) * np.abs(1.0 + norm_w)) @ np.abs(w.astype(np.float64))


@settings(max_examples=80, deadline=None)
@given(
    shape=projector_shapes(),
    seed=seeds,
    cfg=chips,
    scale=st.sampled_from([2.0, 2e-3]),  # 2e-3: mean squares of the pooled tokens near eps
)
def test_mm_projector_fp32_both_modes_equal_numpy_and_each_other(shape, seed, cfg, scale):
    g, pool, dv, dt = shape
    x, norm_w, w = projector_inputs(shape, seed, scale=scale)
    ref = mm_projector_reference(x, norm_w, w, pool=pool)
    outs, (tile, fast) = run_both(mm_projector, cfg, "fp32", x, norm_w, w, pool=pool)
    # fp32: pool^2-term window sums, a Dv-term sum of squares (half of it in rsqrt) and the
    # Dv-term product: (Dv + pool^2 + a few) u32 of the magnitudes, twice for slack.
    tol = 2 * (dv + pool**2 + 8) * U_FP32 * projector_magnitude(x, norm_w, w, pool) + 1e-30
    ntok = (g // pool) ** 2
    for out in outs:
        assert out.shape == (ntok, dt)
        assert np.all(np.abs(out - ref) <= tol)
    assert tile == fast  # identical cycle reports: same stream, same schedule
    assert tile.flops == 2 * ntok * dv * dt
    assert tile.cycles >= roofline_moved(tile, cfg)
    assert tile.bytes_by_path["local->dram"] == ntok * dt * 2  # the output leaves once


@settings(max_examples=50, deadline=None)
@given(shape=projector_shapes(), seed=seeds, cfg=chips)
def test_mm_projector_bf16_within_bf16_tolerance(shape, seed, cfg):
    g, pool, dv, dt = shape
    x, norm_w, w = projector_inputs(shape, seed, bf16=True)
    ref = mm_projector_reference(x, norm_w, w, pool=pool)  # on the bf16 inputs the device holds
    outs, _ = run_both(mm_projector, cfg, "bf16", x, norm_w, w, pool=pool)
    # The tiled program rounds to bf16 three times before the output: the window sums S
    # (u of each normed term), the matmul operand S * (1 + norm_w) (u again), and the scale
    # rsqrt(sum S^2 ...) computed from the rounded S (u); the output rounding adds u of |out|
    # <= the magnitude: 4u of the magnitude, plus the fp32 terms of the fp32 test.
    mag = projector_magnitude(x, norm_w, w, pool)
    tol = 4 * U_BF16 * mag + 2 * (dv + pool**2 + 8) * U_FP32 * mag + 1e-30
    for out in outs:
        assert np.all(np.abs(out - ref) <= tol)
        np.testing.assert_array_equal(out, round_bf16(out))


@pytest.mark.parametrize(
    "rb, tail, ahead, cfg",
    [(1, 1, 1, TINY4), (1, 3, 2, TINY), (2, 2, 2, TINY4), (3, 1, 2, TINY)],
    ids=lambda v: v.name if hasattr(v, "name") else str(v),
)
def test_mm_projector_token_blocks_tails_and_prefetch(rb, tail, ahead, cfg):
    """Several token blocks (w streamed once per block), each tail length and prefetch distance."""
    shape = (9, 3, 40, 70)  # 3 x 3 tokens from a 9 x 9 grid
    x, norm_w, w = projector_inputs(shape, 11)
    base = choose_projector_tiling(cfg, 9, 3, 40, 70)
    t = ProjectorTiling(base.tk, base.cw, rb, base.tn, tail, base.tn_tail, ahead)
    out, rep = NPU(cfg, mode="tile", numerics="fp32").run(mm_projector, x, norm_w, w, pool=3, tiling=t)
    ref = mm_projector_reference(x, norm_w, w, pool=3)
    assert np.all(np.abs(out - ref) <= 2 * (40 + 9 + 8) * U_FP32 * projector_magnitude(x, norm_w, w, 3))
    blocks = -(-3 // rb)
    assert rep.bytes_by_path["dram->local"] >= blocks * 40 * 70 * 2  # w once per block


def test_mm_projector_pools_in_grid_order():
    """Token (i, j) is the mean of grid rows i*pool.. and columns j*pool.. (patch n = r * g + c):
    with norm_w = -1 the norm outputs 0, so use w = I and a constant-per-window x instead."""
    g, pool, dv = 4, 2, 8
    x = np.zeros((g * g, dv), np.float32)
    for r in range(g):
        for c in range(g):
            x[r * g + c] = (r // pool) * 2 + (c // pool) + 1  # window id 1..4
    out, _ = NPU(TINY4, mode="tile", numerics="fp32").run(
        mm_projector, x, np.zeros(dv, np.float32), np.eye(dv, dtype=np.float32), pool=pool
    )
    # Each token is a constant row v: RMSNorm gives v / sqrt(v^2 + eps) ~ 1 in every column.
    np.testing.assert_allclose(out, np.ones((4, dv)), rtol=1e-5)
    x[0] = -x[0]  # window 1 now sums to (-1 + 1 + 1 + 1) / 4 = 0.5 in grid order
    out, _ = NPU(TINY4, mode="tile", numerics="fp32").run(
        mm_projector, x, np.zeros(dv, np.float32), np.eye(dv, dtype=np.float32), pool=pool
    )
    np.testing.assert_allclose(out, mm_projector_reference(x, np.zeros(dv), np.eye(dv), pool=pool), rtol=1e-5)


def test_mm_projector_rejects_bad_grids():
    npu = NPU(TINY)
    with pytest.raises(KernelError, match="multiple of pool"):
        npu.plan(mm_projector, [((36, 8), "bf16"), ((8,), "bf16"), ((8, 4), "bf16")], {"pool": 4})
    with pytest.raises(KernelError, match="g \\* g"):
        npu.plan(mm_projector, [((30, 8), "bf16"), ((8,), "bf16"), ((8, 4), "bf16")], {"pool": 1})
