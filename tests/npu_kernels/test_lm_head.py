import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npu_emulator import NPU, TINY, KernelError, round_bf16
from npu_kernels import hostmath
from npu_kernels.lm_head import ArgmaxScreen, LmHeadPlan, lm_head, lm_head_fast, lm_head_reference
from tests.strategies import TINY4, arrays, chips, lm_head_cases, seeds

# On TINY4 V splits over engines and engine 0 combines their partial maxima at test sizes.
VMAX = TINY.vector_max_elements

U_FP32 = 2.0**-24


def roofline_moved(rep, cfg):
    return max(rep.flops / cfg.peak_flops_per_cycle, rep.dram_bytes / cfg.dram_bytes_per_cycle)


def logits_bound(x, w, softcap):
    """fp32 sums of D products in any order: D * u * sum |x||w| (twice for safety, as the
    matmul tests); the softcap is 1-Lipschitz and adds a few roundings of its terms."""
    mag = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64)
    bound = 2 * x.shape[1] * U_FP32 * mag + 1e-30
    if softcap is not None:
        bound = bound + 4 * U_FP32 * (np.minimum(mag, softcap) + softcap)
    return bound


def run_both(cfg, numerics, *inputs, **consts):
    results = [NPU(cfg, mode=m, numerics=numerics).run(lm_head, *inputs, **consts) for m in ("tile", "fast")]
    return [r[0] for r in results], [r[1] for r in results]


def check_next_token(logits, next_token, ids):
    # The first maximum of the logits the kernel returned, looked up in vocab_ids.
    np.testing.assert_array_equal(next_token, ids[np.argmax(logits, axis=-1)])
    assert next_token.dtype == np.int32


@settings(max_examples=60, deadline=None)
@given(case=lm_head_cases(), seed=seeds, softcap=st.sampled_from([None, 5.0, 30.0]), cfg=chips)
def test_fp32_both_modes_equal_numpy_and_each_other(case, seed, softcap, cfg):
    b, d, v = case
    x, w = arrays((b, d), seed), arrays((d, v), seed + 1)
    ids = np.arange(v, dtype=np.int32)
    ref_logits, _ = lm_head_reference(x, w, ids, softcap=softcap)
    bound = logits_bound(x, w, softcap)
    outs, (rep_tile, rep_fast) = run_both(cfg, "fp32", x, w, ids, softcap=softcap)
    for logits, next_token in outs:
        assert logits.shape == (b, v) and logits.dtype == np.float32 and next_token.shape == (b,)
        assert np.all(np.abs(logits - ref_logits) <= bound)
        check_next_token(logits, next_token, ids)
        # and in exact arithmetic the token chosen is a maximum to within the rounding
        chosen = ref_logits[np.arange(b), next_token]
        assert np.all(chosen >= ref_logits.max(axis=1) - 2 * bound.max(axis=1))
    assert rep_tile == rep_fast  # identical cycle reports: same stream, same schedule
    assert rep_tile.flops == 2 * b * d * v
    assert rep_tile.cycles >= roofline_moved(rep_tile, cfg)
    assert rep_tile.bytes_by_path["local->dram"] == b * v * 4  # the logits, once


@settings(max_examples=30, deadline=None)
@given(case=lm_head_cases(max_d=80, max_v=400), seed=seeds, softcap=st.sampled_from([None, 30.0]), cfg=chips)
def test_bf16_inputs_fp32_logits(case, seed, softcap, cfg):
    b, d, v = case
    x, w = arrays((b, d), seed), arrays((d, v), seed + 1)
    ids = np.arange(v, dtype=np.int32)
    xr, wr = round_bf16(x), round_bf16(w)  # what the device holds
    ref_logits, _ = lm_head_reference(xr, wr, ids, softcap=softcap)
    for logits, next_token in run_both(cfg, "bf16", x, w, ids, softcap=softcap)[0]:
        # bf16 inputs, fp32 accumulation and fp32 logits: the fp32 bound on the rounded inputs.
        assert np.all(np.abs(logits - ref_logits) <= logits_bound(xr, wr, softcap))
        check_next_token(logits, next_token, ids)


@settings(max_examples=40, deadline=None)
@given(case=lm_head_cases(max_d=40), seed=seeds, softcap=st.sampled_from([None, 30.0]), cfg=chips)
def test_ties_take_the_first_index(case, seed, softcap, cfg):
    # Small integers: every product and sum is exact in bf16 and fp32, so logits tie exactly
    # (many times over) and the first maximum is well defined in both modes and the reference.
    b, d, v = case
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, (b, d)).astype(np.float32)
    w = rng.integers(-2, 3, (d, v)).astype(np.float32)
    ids = np.arange(v, dtype=np.int32)
    _, want = lm_head_reference(x, w, ids, softcap=softcap)
    for _, next_token in run_both(cfg, "bf16", x, w, ids, softcap=softcap)[0]:
        np.testing.assert_array_equal(next_token, want)


@pytest.mark.parametrize("cfg", [TINY, TINY4])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_ties_across_engines_and_segments(cfg, softcap):
    # x = I, so row b's logits are w[b]. V > 2 x vector_max_elements: on tiny, argmax segments
    # [0, 4096), [4096, 8192), [8192, 9000); on tiny4, engine blocks of 2256 columns.
    b, v = 3, 9000
    x = np.eye(b, dtype=np.float32)
    w = np.zeros((b, v), np.float32)
    w[0, [8500, 8191, 4097]] = 5.0  # ties within and across segments / engines: 4097 first
    w[1] = -1.0
    w[1, [8999, 6000]] = 0.0  # 6000 first
    w[2, [8191, 4097, 100]] = 2.0  # 100 first
    ids = np.arange(v, dtype=np.int32)
    want = np.array([4097, 6000, 100], np.int32)
    np.testing.assert_array_equal(lm_head_reference(x, w, ids, softcap=softcap)[1], want)
    for _, next_token in run_both(cfg, "fp32", x, w, ids, softcap=softcap)[0]:
        np.testing.assert_array_equal(next_token, want)


def test_vocab_ids_are_looked_up():
    b, d, v = 2, 20, 300
    x, w = arrays((b, d), 1), arrays((d, v), 2)
    ids = np.random.default_rng(0).permutation(v).astype(np.int32) + 1000
    for logits, next_token in run_both(TINY4, "fp32", x, w, ids, softcap=None)[0]:
        check_next_token(logits, next_token, ids)


@pytest.mark.parametrize("plan", [LmHeadPlan(tk=16, tn=24, depth=1), LmHeadPlan(tk=64, tn=8, depth=2)])
def test_other_tilings(plan):
    b, d, v = 3, 70, 130
    x, w = arrays((b, d), 5), arrays((d, v), 6)
    ids = np.arange(v, dtype=np.int32)
    ref_logits, _ = lm_head_reference(x, w, ids, softcap=20.0)
    outs, (rep_tile, rep_fast) = run_both(TINY4, "fp32", x, w, ids, softcap=20.0, plan=plan)
    for logits, next_token in outs:
        assert np.all(np.abs(logits - ref_logits) <= logits_bound(x, w, 20.0))
        check_next_token(logits, next_token, ids)
    assert rep_tile == rep_fast


def test_vocab_ids_are_required():
    x, w = arrays((1, 8), 0), arrays((8, 16), 1)
    with pytest.raises(KernelError, match="pass vocab_ids"):
        NPU(TINY).run(lm_head, x, w)


def test_atom_reaches_the_roofline():
    d, v = 640, 262144
    sig = [((1, d), "bf16"), ((d, v), "bf16"), ((v,), "int32")]
    rep = NPU("atom").plan(lm_head, sig, {"softcap": 30.0}).report
    assert rep.pct_of_roofline >= 85.0


# ------------------------------------------------------------ the host's argmax screen


def screen_case(k, v, dtype, seed, scale=0.05):
    rng = np.random.default_rng(seed)
    w = hostmath.column_major(rng.standard_normal((k, v)).astype(np.float32) * scale, dtype)
    return w, np.arange(v, dtype=np.int32)


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 90),
    v=st.integers(1, 700),
    b=st.integers(1, 3),
    dtype=st.sampled_from([np.float32, hostmath.BF16]),
    seed=seeds,
)
def test_screen_gives_lm_head_fast_s_ids(k, v, b, dtype, seed):
    w, ids = screen_case(k, v, dtype, seed)
    x = arrays((b, k), seed + 1)
    np.testing.assert_array_equal(ArgmaxScreen(w)(x, ids), lm_head_fast(x, w, ids)[1])


@pytest.mark.parametrize("dtype", [np.float32, hostmath.BF16])
def test_screen_on_ties_and_near_ties(dtype):
    """Equal rows (the first wins), a row one bf16 step below them, a zero row, and inputs that
    make the tied rows the maximum: 300 inputs, each id as lm_head_fast's."""
    k, v = 64, 3000
    w, ids = screen_case(k, v, dtype, 3)
    rows = np.array(w.T, np.float32)
    rows[[10, 11, 2999]] = rows[2000]  # ties: 10 must win
    rows[12] = rows[2000] * np.float32(1 - 2**-8)  # one bf16 step smaller: a near tie below
    rows[13] = 0.0
    w = hostmath.column_major(rows.T, dtype)
    screen = ArgmaxScreen(w)
    rng = np.random.default_rng(4)
    for t in range(300):
        x = rng.standard_normal((2, k)).astype(np.float32)
        if t % 2:
            x[0] = np.abs(rows[2000]) * np.sign(rows[2000]) * 30  # the tied rows lead
            x[1] = 0.0  # every logit 0: id 0
        got = screen(x, ids)
        np.testing.assert_array_equal(got, lm_head_fast(x, w, ids)[1])
        if t % 2:
            assert got.tolist() == [10, 0]


def test_screen_looks_up_vocab_ids_and_declines_non_finite_input():
    w, _ = screen_case(32, 100, hostmath.BF16, 5)
    ids = np.arange(1000, 1100, dtype=np.int32)[::-1].copy()
    x = arrays((2, 32), 6)
    np.testing.assert_array_equal(ArgmaxScreen(w)(x, ids), lm_head_fast(x, w, ids)[1])
    x[1, 3] = np.nan
    assert ArgmaxScreen(w)(x, ids) is None
    with pytest.raises(KernelError, match=r"lm_head screen: x \(2, 31\) does not match w \(32, 100\)"):
        ArgmaxScreen(w)(x[:, :31], ids)


def test_screen_holds_int8_rows_within_their_bound():
    w, _ = screen_case(70, 500, np.float32, 7, scale=3.0)
    screen = ArgmaxScreen(w)
    rows = np.asarray(w.T, np.float64)
    assert screen.q.dtype == np.int8 and screen.nbytes == 500 * 70 + 500 * 4 + 500 * 8
    np.testing.assert_array_equal(
        screen.err, np.abs(rows - screen.q * screen.scale[:, None].astype(np.float64)).max(1)
    )
    assert (np.abs(rows).max(1) <= 128 * screen.scale).all()


def test_screen_with_non_finite_weights():
    """A row holding inf or NaN is always computed: the ids are lm_head_fast's (NaN wins first)."""
    w, ids = screen_case(24, 300, np.float32, 8)
    rows = np.array(w.T)
    rows[40, 3], rows[7, 0], rows[200, 5] = np.nan, np.inf, -np.inf
    w = hostmath.column_major(rows.T)
    screen = ArgmaxScreen(w)
    assert np.isinf(screen.err[[7, 40, 200]]).all() and np.isfinite(np.delete(screen.err, [7, 40, 200])).all()
    for seed in range(20):
        x = arrays((2, 24), seed)
        x[1, 3] = 0.0  # row 40's NaN meets a zero: still NaN
        np.testing.assert_array_equal(screen(x, ids), lm_head_fast(x, w, ids)[1])
