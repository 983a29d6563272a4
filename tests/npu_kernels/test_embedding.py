import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npu_emulator import NPU, TINY, KernelError, OutOfBoundsError, round_bf16
from npu_kernels.embedding import EmbeddingPlan, embedding, embedding_reference
from tests.strategies import TINY4, arrays, chips, embedding_cases, seeds

# On TINY4 token blocks and column blocks over engines (one decode token: every engine gathers
# a slice of the row) run at test sizes.

U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
U_FP32 = 2.0**-24


def make_inputs(case, seed):
    tokens, vocab, width = case
    table = arrays((vocab, width), seed)
    ids = np.random.default_rng(seed + 1).integers(0, vocab, tokens).astype(np.int32)  # repeats too
    return ids, table


def roofline_moved(rep, cfg):
    return max(rep.flops / cfg.peak_flops_per_cycle, rep.dram_bytes / cfg.dram_bytes_per_cycle)


def run_both(cfg, numerics, *inputs, **consts):
    results = [
        NPU(cfg, mode=m, numerics=numerics).run(embedding, *inputs, **consts) for m in ("tile", "fast")
    ]
    return [r[0] for r in results], [r[1] for r in results]


@settings(max_examples=60, deadline=None)
@given(case=embedding_cases(), seed=seeds, scale=st.sampled_from([1.0, 0.5, 25.3, 73.3]), cfg=chips)
def test_fp32_both_modes_equal_numpy_and_each_other(case, seed, scale, cfg):
    ids, table = make_inputs(case, seed)
    ref = embedding_reference(ids, table, scale=scale)
    (tile, fast), (rep_tile, rep_fast) = run_both(cfg, "fp32", ids, table, scale=scale)
    for out in (tile, fast):
        assert out.shape == (len(ids), table.shape[1])
        # One fp32 product (the scale as an fp32 scalar: one more rounding).
        assert np.all(np.abs(out - ref) <= 2 * U_FP32 * np.abs(ref) + 1e-37)
    assert rep_tile == rep_fast  # identical cycle reports: same stream, same schedule
    assert rep_tile.flops == 0
    assert rep_tile.cycles >= roofline_moved(rep_tile, cfg)
    # Only the rows looked up cross the DRAM bus (and the ids, once per engine sharing them).
    rows = 2 * ids.size * table.shape[1]
    assert rep_tile.bytes_by_path["local->dram"] == rows
    assert (
        rows + 4 * ids.size <= rep_tile.bytes_by_path["dram->local"] <= rows + 4 * ids.size * cfg.num_engines
    )


@settings(max_examples=30, deadline=None)
@given(case=embedding_cases(max_tokens=20), seed=seeds, cfg=chips)
def test_bf16_within_bf16_tolerance(case, seed, cfg):
    ids, table = make_inputs(case, seed)
    scale = float(round_bf16(np.sqrt(np.float32(table.shape[1]))))  # Gemma: sqrt(D) in the weight dtype
    ref = embedding_reference(ids, round_bf16(table), scale=scale)
    (tile, fast), _ = run_both(cfg, "bf16", ids, table, scale=scale)
    for out in (tile, fast):
        # bf16 rows times a bf16 scale in fp32, rounded once to bf16: u_bf16 relative.
        assert np.all(np.abs(out - ref) <= (U_BF16 + U_FP32) * np.abs(ref) + 1e-37)
        np.testing.assert_array_equal(out, round_bf16(out))


@pytest.mark.parametrize(
    "cfg, case, plan",
    [
        (TINY, (3, 10, 5000), None),  # D > vector_max_elements: several instructions per row
        (TINY, (9, 50, 40), EmbeddingPlan(gd=1, tt=2, depth=1)),  # single buffered
        (TINY4, (1, 30, 70), EmbeddingPlan(gd=4, tt=1)),  # one token, columns over engines
        (TINY4, (2, 30, 3), None),  # fewer columns than engines
        (TINY4, (11, 100, 64), EmbeddingPlan(gd=1, tt=3, depth=2)),
    ],
)
def test_plans_and_wide_rows(cfg, case, plan):
    ids, table = make_inputs(case, 4)
    consts = {"scale": 3.0} | ({} if plan is None else {"plan": plan})
    ref = embedding_reference(ids, table, scale=3.0)
    (tile, fast), (rep_tile, rep_fast) = run_both(cfg, "fp32", ids, table, **consts)
    for out in (tile, fast):
        np.testing.assert_array_equal(out, ref.astype(np.float32))  # times 3: one rounding, as NumPy's
    assert rep_tile == rep_fast


def test_ids_out_of_range_are_refused():
    table = arrays((10, 4), 0)
    bad = np.array([0, 10], np.int32)
    with pytest.raises(OutOfBoundsError, match="index 10 at row"):
        NPU(TINY, mode="tile").run(embedding, bad, table, scale=1.0)
    with pytest.raises(KernelError, match=r"ids must lie in \[0, 10\)"):
        NPU(TINY, mode="fast").run(embedding, bad, table, scale=1.0)


def test_atom_reaches_the_gathered_rows_bound():
    t, v, d = 256, 262144, 2560
    rep = NPU("atom").plan(embedding, [((t,), "int32"), ((v, d), "bf16")], {"scale": 50.5}).report
    # The report counts the whole table as compulsory; the honest bound is the rows gathered.
    moved = 2 * t * d * 2 + 4 * t
    assert rep.dram_bytes == moved
    assert moved / rep.dram_bytes_per_cycle >= 0.85 * rep.cycles
