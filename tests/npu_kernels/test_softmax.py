import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npu_emulator import NPU, TINY, round_bf16
from npu_kernels.softmax import SoftmaxPlan, choose_plan, softmax, softmax_reference
from tests.strategies import TINY4, VMAX, arrays, chips, seeds, softmax_shapes

# On TINY4 engine groups that split a row's columns (and exchange partial maxima and sums) run
# at test sizes. VMAX is TINY's per-instruction limit: wider rows are column-chunked.

U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
U_FP32 = 2.0**-24


def fp32_bound(x, ref):
    """Per-element bound on |out - ref| with fp32 math: exp(x - m) has relative error about
    u * |x - m| (the subtraction's rounding) plus a few ulps; the per-chunk and cross-engine
    factors exp(m_c - M) likewise; a sum of C terms adds at most C * u (any order)."""
    x = x.astype(np.float64)
    spread = x.max(axis=-1, keepdims=True) - x.min(axis=-1, keepdims=True)
    return ref * U_FP32 * (16 + 4 * spread + 2 * x.shape[-1]) + 1e-37


def roofline_moved(rep, cfg):
    return max(rep.flops / cfg.peak_flops_per_cycle, rep.dram_bytes / cfg.dram_bytes_per_cycle)


def run_both(cfg, x, numerics, **consts):
    outs, reps = [], []
    for mode in ("tile", "fast"):
        out, rep = NPU(cfg, mode=mode, numerics=numerics).run(softmax, x, **consts)
        outs.append(out)
        reps.append(rep)
    return outs, reps


@settings(max_examples=30, deadline=None)
@given(shape=softmax_shapes(), seed=seeds, scale=st.sampled_from([1.0, 8.0, 60.0]), cfg=chips)
def test_fp32_both_modes_equal_numpy_and_each_other(shape, seed, scale, cfg):
    x = arrays(shape, seed, scale)
    ref = softmax_reference(x)
    (tile, fast), (rep_tile, rep_fast) = run_both(cfg, x, "fp32")
    bound = fp32_bound(x, ref)
    for out in (tile, fast):
        assert out.shape == shape and out.dtype == np.float32
        assert np.all(np.abs(out - ref) <= bound)
    assert rep_tile == rep_fast  # identical cycle reports: same stream, same schedule
    assert rep_tile.flops == 0
    assert rep_tile.cycles >= roofline_moved(rep_tile, cfg)
    # x is read at least once and out written once
    assert rep_tile.bytes_by_path["local->dram"] == x.size * 2
    assert rep_tile.bytes_by_path["dram->local"] >= x.size * 2


@settings(max_examples=15, deadline=None)
@given(shape=softmax_shapes(max_elements=12_000), seed=seeds, cfg=chips)
def test_bf16_within_bf16_tolerance(shape, seed, cfg):
    x = arrays(shape, seed, 4.0)
    xr = round_bf16(x)  # what the device holds
    ref = softmax_reference(xr)
    (tile, fast), _ = run_both(cfg, x, "bf16")
    for out in (tile, fast):
        # fp32 math, then one rounding to bf16 on the way out (half an ulp: <= u_bf16 / 2 relative).
        assert np.all(np.abs(out - ref) <= U_BF16 * ref + fp32_bound(xr, ref))
        np.testing.assert_array_equal(out, round_bf16(out))


EXTREME = np.array(
    [
        [1e4, -1e4, 1e4 - 1, 3.0, -1e4 + 5, 1e4, 0.0],  # exp(1e4) overflows fp32 naively
        [-1e4, -1e4 + 2, -1e4 + 1, -1e4, -1e4, -1e4 + 2, -1e4],  # exp(-1e4) underflows to 0 naively
        [1e4] * 7,  # uniform at the top of the range
        [-3e38, 3e38, 0.0, 1.0, -1.0, 2e38, 3e38],  # near fp32's limits
    ],
    np.float32,
)


# x - m overflows to -inf for the +-3e38 row (exp then gives the right 0): NumPy warns.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("cfg", [TINY, TINY4])
@pytest.mark.parametrize("numerics", ["fp32", "bf16"])
@pytest.mark.parametrize("width", [7, VMAX + 5])  # one chunk, and several chunks / engines
def test_extreme_values_are_stable(cfg, numerics, width):
    x = np.tile(EXTREME, (1, -(-width // EXTREME.shape[1])))[:, :width]
    if width > EXTREME.shape[1]:  # partial maxima in different chunks: the max in the last one
        x[:, -1] = x.max(axis=1)
    xs = round_bf16(x) if numerics == "bf16" else x
    ref = softmax_reference(xs)
    (tile, fast), (rep_tile, rep_fast) = run_both(cfg, x, numerics)
    for out in (tile, fast):
        assert np.all(np.isfinite(out))
        np.testing.assert_allclose(
            out.sum(axis=1), 1.0, rtol=width * U_FP32 + (U_BF16 if numerics == "bf16" else 0)
        )
        # The subtraction x - m of values ~3e38 apart is not exact: absolute, not relative, here.
        tol = (U_BF16 * ref if numerics == "bf16" else 0) + 8 * width * U_FP32 * ref + 1e-30
        assert np.all(np.abs(out - ref) <= tol)
    assert rep_tile == rep_fast


@pytest.mark.parametrize(
    "cfg, plan",
    [
        (TINY, None),
        (TINY, SoftmaxPlan(g=1, tr=2, cw=40, resident=False)),
        (TINY4, SoftmaxPlan(g=4, tr=1, cw=25, resident=True)),
        (TINY4, SoftmaxPlan(g=2, tr=3, cw=30, resident=False)),
    ],
)
def test_masked_entries_and_masked_chunks(cfg, plan):
    # A causal mask fills -inf: on the first rows whole chunks (and engine blocks) are masked.
    rows, cols = 6, 200
    x = arrays((rows, cols), 9, 4.0)
    x[np.arange(cols)[None, :] > 30 * np.arange(rows)[:, None]] = -np.inf
    ref = softmax_reference(x)
    consts = {} if plan is None else {"plan": plan}
    (tile, fast), (rep_tile, rep_fast) = run_both(cfg, x, "fp32", **consts)
    for out in (tile, fast):
        assert np.all(out[~np.isfinite(x)] == 0.0)
        finite = np.where(np.isfinite(x), x, x[:, :1])  # the bound's spread over unmasked entries
        assert np.all(np.abs(out - ref) <= fp32_bound(finite, ref))
    assert rep_tile == rep_fast


PLANS = [
    (TINY, SoftmaxPlan(g=1, tr=2, cw=100, resident=False)),  # two passes over DRAM
    (TINY, SoftmaxPlan(g=1, tr=3, cw=450, resident=True, depth=3)),
    (TINY4, SoftmaxPlan(g=2, tr=1, cw=70, resident=False)),  # two engines per row, recompute
    (TINY4, SoftmaxPlan(g=4, tr=2, cw=113, resident=True)),  # four engines per row
    (TINY4, SoftmaxPlan(g=1, tr=1, cw=450, resident=True, depth=1)),
]


@pytest.mark.parametrize("cfg, plan", PLANS)
def test_every_plan_computes_the_same_softmax(cfg, plan):
    x = arrays((5, 450), 7, 10.0)
    ref = softmax_reference(x)
    (tile, fast), (rep_tile, rep_fast) = run_both(cfg, x, "fp32", plan=plan)
    for out in (tile, fast):
        assert np.all(np.abs(out - ref) <= fp32_bound(x, ref))
    assert rep_tile == rep_fast
    reads = rep_tile.bytes_by_path["dram->local"]
    assert reads == x.size * 2 * (1 if plan.resident else 2)  # the two-pass plan reads x twice


def test_rows_wider_than_local_sram_take_two_passes():
    cols = 30_000  # 60 KB of bf16, but 120 KB of fp32 exp per buffer: not resident on tiny
    assert not choose_plan(TINY, 2, cols, "bf16").resident
    x = arrays((2, cols), 3, 5.0)
    ref = softmax_reference(x)
    out, _ = NPU(TINY, mode="tile", numerics="fp32").run(softmax, x)
    assert np.all(np.abs(out - ref) <= fp32_bound(x, ref))


def test_leading_axes_are_rows():
    x = arrays((2, 3, 50), 11, 3.0)
    out, _ = NPU(TINY4, mode="tile", numerics="fp32").run(softmax, x)
    ref = softmax_reference(x)
    assert out.shape == x.shape
    assert np.all(np.abs(out - ref) <= fp32_bound(x, ref))


@pytest.mark.parametrize("shape", [(1024, 512), (4, 262144)])
def test_atom_reaches_the_dram_bound(shape):
    rep = NPU("atom").plan(softmax, [(shape, "bf16")], {}).report
    assert rep.dram_bytes == 2 * 2 * shape[0] * shape[1]  # x once in, out once out
    assert rep.pct_of_roofline >= 85.0
