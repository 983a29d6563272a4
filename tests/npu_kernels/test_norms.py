import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npu_emulator import NPU, TINY, KernelError, round_bf16
from npu_kernels.norms import layernorm, layernorm_reference, rmsnorm, rmsnorm_reference
from tests.strategies import TINY4, arrays, chips, row_shapes, seeds

# On TINY4 rows split over engines at test sizes.
# 1e-3: mean squares near eps = 1e-6, so where eps enters the formula shows in the result.
SCALES = st.sampled_from([1.0, 1e-3])

U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
U_FP32 = 2.0**-24


def roofline_moved(rep, cfg):
    return max(rep.flops / cfg.peak_flops_per_cycle, rep.dram_bytes / cfg.dram_bytes_per_cycle)


def check_reports(reports, cfg, x_shape):
    tile, fast = reports
    assert tile == fast  # identical cycle reports: same stream, same schedule
    assert tile.flops == 0  # nothing on the matrix unit
    assert tile.cycles >= roofline_moved(tile, cfg)
    assert tile.bytes_by_path["local->dram"] == int(np.prod(x_shape)) * 2  # the output, once


def run_both(kernel, cfg, numerics, *inputs, **consts):
    outs, reports = [], []
    for mode in ("tile", "fast"):
        out, rep = NPU(cfg, mode=mode, numerics=numerics).run(kernel, *inputs, **consts)
        outs.append(out)
        reports.append(rep)
    return outs, reports


# ------------------------------------------------------------------------------- RMSNorm


def rms_tolerance(x, w, width, bf16: bool):
    """|y| bounds the error terms: the fp32 sum of `width` squares is off by at most
    width * u32 relative (so rsqrt by half that), then a few roundings; bf16 output adds u."""
    y = np.abs(rmsnorm_reference(x, w))
    tol = (width + 8) * U_FP32 * y
    return tol + U_BF16 * y if bf16 else tol


@settings(max_examples=100, deadline=None)
@given(shape=row_shapes(), seed=seeds, cfg=chips, scale=SCALES)
def test_rmsnorm_fp32_both_modes_equal_numpy_and_each_other(shape, seed, cfg, scale):
    width = shape[-1]
    x, w = arrays(shape, seed, scale), arrays((width,), seed + 1, 0.5)
    ref = rmsnorm_reference(x, w)
    outs, reports = run_both(rmsnorm, cfg, "fp32", x, w)
    for out in outs:
        assert out.shape == x.shape
        assert np.all(np.abs(out - ref) <= rms_tolerance(x, w, width, False) + 1e-30)
    check_reports(reports, cfg, x.shape)


@settings(max_examples=60, deadline=None)
@given(shape=row_shapes(), seed=seeds, cfg=chips)
def test_rmsnorm_bf16_within_bf16_tolerance(shape, seed, cfg):
    width = shape[-1]
    x, w = round_bf16(arrays(shape, seed, 3.0)), round_bf16(arrays((width,), seed + 1, 0.5))
    ref = rmsnorm_reference(x, w)  # on the bf16 inputs the device holds
    outs, _ = run_both(rmsnorm, cfg, "bf16", x, w)
    for out in outs:
        # All math in fp32, one rounding of the output to bf16.
        assert np.all(np.abs(out - ref) <= rms_tolerance(x, w, width, True) + 1e-30)
        np.testing.assert_array_equal(out, round_bf16(out))


@pytest.mark.parametrize("cfg", [TINY, TINY4], ids=lambda c: c.name)
def test_rmsnorm_per_head_normalises_each_head(cfg):
    """q_norm / k_norm: x (T, H, hd) normed over each head with one w (hd,)."""
    t, h, hd = 5, 3, 16
    x, w = arrays((t, h, hd), 7), arrays((hd,), 8, 0.5)
    out, _ = NPU(cfg, mode="tile", numerics="fp32").run(rmsnorm, x, w)
    for i in range(t):
        for j in range(h):
            v = x[i, j].astype(np.float64)
            want = v / np.sqrt(np.mean(v * v) + 1e-6) * (1 + w)
            np.testing.assert_allclose(out[i, j], want, rtol=1e-5, atol=1e-6)


def test_rmsnorm_rejects_a_weight_that_does_not_divide_the_rows():
    with pytest.raises(KernelError, match="divide"):
        NPU(TINY).plan(rmsnorm, [((4, 10), "bf16"), ((3,), "bf16")], {})


# ----------------------------------------------------------------------------- LayerNorm


def ln_tolerance(x, w, b, bf16: bool):
    """The fp32 mean is off by at most D * u32 * mean|x|; subtracting it leaves that absolute
    error on every centred value, and the variance (a sum of D squares) and rsqrt add about
    D * u32 relative; scaled by rsqrt(var + eps) * |w|, plus roundings of the bias add.
    bf16 numerics add one rounding of the output (u of |y|)."""
    d = x.shape[-1]
    g = x.astype(np.float64)
    mean = g.mean(axis=-1, keepdims=True)
    inv = 1.0 / np.sqrt(((g - mean) ** 2).mean(axis=-1, keepdims=True) + 1e-6)
    scale = np.abs(g).mean(axis=-1, keepdims=True) + np.abs(g - mean)
    tol = 2 * (d + 4) * U_FP32 * inv * scale * np.abs(w) + 4 * U_FP32 * np.abs(b)
    return tol + U_BF16 * np.abs(layernorm_reference(x, w, b)) if bf16 else tol


@settings(max_examples=100, deadline=None)
@given(
    shape=row_shapes(),
    seed=seeds,
    cfg=chips,
    scale=SCALES,
    offset=st.sampled_from([0.0, 3.0]),  # a mean far from 0: the variance must be two-pass
)
def test_layernorm_fp32_both_modes_equal_numpy_and_each_other(shape, seed, cfg, scale, offset):
    d = shape[-1]
    x = arrays(shape, seed, scale) + np.float32(offset * scale)
    w, b = arrays((d,), seed + 1), arrays((d,), seed + 2)
    ref = layernorm_reference(x, w, b)
    outs, reports = run_both(layernorm, cfg, "fp32", x, w, b)
    for out in outs:
        assert out.shape == x.shape
        assert np.all(np.abs(out - ref) <= ln_tolerance(x, w, b, False) + 1e-30)
    check_reports(reports, cfg, x.shape)


@settings(max_examples=60, deadline=None)
@given(shape=row_shapes(), seed=seeds, cfg=chips)
def test_layernorm_bf16_within_bf16_tolerance(shape, seed, cfg):
    d = shape[-1]
    x = round_bf16(arrays(shape, seed, 2.0) + np.float32(1.0))
    w, b = round_bf16(arrays((d,), seed + 1)), round_bf16(arrays((d,), seed + 2))
    ref = layernorm_reference(x, w, b)  # on the bf16 inputs the device holds
    outs, _ = run_both(layernorm, cfg, "bf16", x, w, b)
    for out in outs:
        assert np.all(np.abs(out - ref) <= ln_tolerance(x, w, b, True) + 1e-30)
        np.testing.assert_array_equal(out, round_bf16(out))


def test_layernorm_matches_torch_semantics_on_a_constant_row():
    """A constant row has zero variance: the output is the bias (eps keeps it finite)."""
    x = np.full((2, 24), 5.0, np.float32)
    w, b = arrays((24,), 1), arrays((24,), 2)
    for mode in ("tile", "fast"):
        out, _ = NPU(TINY4, mode=mode, numerics="fp32").run(layernorm, x, w, b)
        np.testing.assert_allclose(out, np.broadcast_to(b, x.shape), rtol=0, atol=1e-6)


def test_layernorm_rejects_mismatched_weights():
    with pytest.raises(KernelError, match="layernorm"):
        NPU(TINY).plan(layernorm, [((4, 10), "bf16"), ((10,), "bf16"), ((9,), "bf16")], {})


@pytest.mark.parametrize("kernel", [rmsnorm, layernorm], ids=lambda k: k.name)
def test_norms_keep_dram_busy_on_atom(kernel):
    """Bandwidth-bound: at a SigLIP / Gemma3 shape the norm runs within 15% of the DRAM bound."""
    d = 1152
    sig = [((256, d), "bf16"), ((d,), "bf16")] + ([((d,), "bf16")] if kernel is layernorm else [])
    rep = NPU("atom").plan(kernel, sig, {}).report
    assert rep.pct_of_roofline >= 85.0
