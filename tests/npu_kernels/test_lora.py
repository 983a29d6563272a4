import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npu_emulator import NPU, TINY, KernelError, OutOfBoundsError, get_preset
from npu_kernels.lora import geglu_combine, geglu_combine_reference, lora, lora_reference
from tests.strategies import arrays, chips, lora_cases, seeds, sizes

U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
U_FP32 = 2.0**-24


def make_inputs(case, seed):
    g, rows, din, dout, r, n = case
    t = g * rows
    x, y = arrays((t, din), seed), arrays((t, dout), seed + 1)
    a, b = arrays((n, din, r), seed + 2), arrays((n, dout, r), seed + 3)
    a[0] = b[0] = 0  # the reserved base adapter
    ids = np.random.default_rng(seed + 4).integers(0, n, g).astype(np.int32)  # repeats too
    return x, y, a, b, ids


def run_both(cfg, numerics, kernel, *inputs):
    results = [NPU(cfg, mode=m, numerics=numerics).run(kernel, *inputs) for m in ("tile", "fast")]
    return [r[0] for r in results], [r[1] for r in results]


def roofline(rep, cfg):
    return max(rep.flops / cfg.peak_flops_per_cycle, rep.dram_bytes / cfg.dram_bytes_per_cycle)


def error_bound(x, a, b, u):
    """|x| |A| |B| summed along both products, times the unit roundoff (and the sum's own)."""
    x, a, b = (np.abs(v.astype(np.float64)) for v in (x, a, b))
    return u * np.einsum("ti,tir,tor->to", x, a, b)


@settings(max_examples=40, deadline=None)
@given(case=lora_cases(), seed=seeds, cfg=chips)
def test_fp32_both_modes_equal_numpy_and_each_other(case, seed, cfg):
    x, y, a, b, ids = make_inputs(case, seed)
    ref = lora_reference(x, y, a, b, ids)
    (tile, fast), (rep_tile, rep_fast) = run_both(cfg, "fp32", lora, x, y, a, b, ids)
    rows = np.repeat(ids, x.shape[0] // len(ids))
    bound = error_bound(x, a[rows], b[rows], 4 * (x.shape[1] + a.shape[2]) * U_FP32) + U_FP32 * np.abs(ref)
    for out in (tile, fast):
        assert out.shape == y.shape
        assert np.all(np.abs(out - ref) <= bound + 1e-30)
    assert np.all(np.abs(tile - fast) <= 2 * bound + 1e-30)  # k-tiled sums round differently
    assert rep_tile == rep_fast  # identical cycle reports: same stream, same schedule
    g, per, din, dout, r, _ = case
    # u = x @ A once per block of output columns (a decode step splits them over the engines)
    t = g * per
    assert rep_tile.flops >= 2 * t * r * (din + dout)
    assert (rep_tile.flops - 2 * t * r * dout) % (2 * t * r * din) == 0
    assert rep_tile.cycles >= roofline(rep_tile, cfg)


@settings(max_examples=25, deadline=None)
@given(case=lora_cases(max_rows=20), seed=seeds, cfg=chips)
def test_bf16_within_bf16_tolerance(case, seed, cfg):
    x, y, a, b, ids = make_inputs(case, seed)
    ref = lora_reference(x, y, a, b, ids)
    (tile, fast), (rep_tile, rep_fast) = run_both(cfg, "bf16", lora, x, y, a, b, ids)
    rows = np.repeat(ids, x.shape[0] // len(ids))
    # inputs rounded to bf16, u stored in bf16 between the products, the sum rounded once
    bound = error_bound(x, a[rows], b[rows], 6 * U_BF16) + 2 * U_BF16 * (np.abs(ref) + np.abs(y))
    for out in (tile, fast):
        assert np.all(np.abs(out - ref) <= bound + 1e-30)
    assert rep_tile == rep_fast


def test_base_adapter_adds_nothing_and_rows_pick_their_adapter():
    x, y, a, b, ids = make_inputs((3, 1, 40, 30, 8, 3), 7)
    ids = np.array([0, 2, 1], np.int32)
    out, _ = NPU(TINY, numerics="fp32").run(lora, x, y, a, b, ids)
    np.testing.assert_array_equal(out[0], y[0])  # id 0: the base model's output, bit for bit
    for row, n in ((1, 2), (2, 1)):
        np.testing.assert_allclose(out[row], y[row] + (x[row] @ a[n]) @ b[n].T, rtol=1e-5, atol=1e-5)


def test_decode_costs_the_adapters_read_not_the_base_weights():
    """One decode row on atom at Gemma 3 4B's q_proj (2560 -> 2048), rank 16: the DRAM bytes are
    x, y, out, the adapter's B once and its A once per engine (each engine computes the whole u
    of the row for its block of output columns), far below the base weights' 2560 x 2048."""
    cfg = get_preset("atom")
    din, dout, r = 2560, 2048, 16
    sig = [
        ((1, din), "bf16"),
        ((1, dout), "bf16"),
        ((4, din, r), "bf16"),
        ((4, dout, r), "bf16"),
        ((1,), "int32"),
    ]
    rep = NPU(cfg).plan(lora, sig, {}).report
    e = cfg.num_engines  # each reads the row, its id and the adapter's A
    assert rep.dram_bytes == (e * din + dout) * r * 2 + (e * din + 2 * dout) * 2 + 4 * e
    assert rep.dram_bytes < din * dout * 2 / 10
    assert rep.cycles >= roofline(rep, cfg)


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((4, 8), (4, 6), (2, 8, 3), (2, 6, 3), (3,)), "4 rows do not split into 3 groups"),
        (((4, 8), (4, 6), (2, 9, 3), (2, 6, 3), (1,)), "shapes do not chain"),
        (((4, 8), (4, 6), (2, 8, 3), (2, 6, 4), (1,)), "shapes do not chain"),
        (((4, 8), (4, 6), (2, 8), (2, 6, 3), (1,)), r"a \(N, Din, R\)"),
    ],
)
def test_bad_shapes_are_named(shapes, message):
    inputs = [np.zeros(s, np.int32 if i == 4 else np.float32) for i, s in enumerate(shapes)]
    for mode in ("tile", "fast"):
        with pytest.raises(KernelError, match=message):
            NPU(TINY, mode=mode, numerics="fp32").run(lora, *inputs)


def test_ids_out_of_range_raise():
    x, y, a, b, _ = make_inputs((2, 1, 8, 8, 2, 2), 1)
    for mode, error, message in (
        ("tile", OutOfBoundsError, "index 5 at row 0 is outside table 'a' of 2 rows"),
        ("fast", KernelError, r"ids must lie in \[0, 2\), got 0..5"),
    ):
        with pytest.raises(error, match=message):
            NPU(TINY, mode=mode, numerics="fp32").run(lora, x, y, a, b, np.array([0, 5], np.int32))


def test_rank_past_the_matrix_unit_is_refused():
    x, y, a, b, ids = make_inputs((1, 1, 8, 8, 65, 2), 1)
    with pytest.raises(KernelError, match="rank 65 exceeds the matrix unit's limits"):
        NPU(TINY, mode="tile", numerics="fp32").run(lora, x, y, a, b, ids)


@settings(max_examples=25, deadline=None)
@given(shape=st.tuples(sizes(max_value=40), sizes(max_value=300)), seed=seeds, cfg=chips)
def test_geglu_combine_both_modes(shape, seed, cfg):
    gate, up = arrays(shape, seed), arrays(shape, seed + 1)
    ref = geglu_combine_reference(gate, up)
    (tile, fast), (rep_tile, rep_fast) = run_both(cfg, "fp32", geglu_combine, gate, up)
    for out in (tile, fast):
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert rep_tile == rep_fast
