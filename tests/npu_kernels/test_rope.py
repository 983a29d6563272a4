import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npu_emulator import NPU, TINY, KernelError, OutOfBoundsError, round_bf16
from npu_kernels.rope import RopePlan, rope, rope_reference, rope_tables, rotate_half
from tests.strategies import TINY4, arrays, chips, rope_cases, seeds

# On TINY4 token blocks and head blocks over engines (decode: fewer tokens than engines) run
# at test sizes.
VMAX = TINY.vector_max_elements

U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
U_FP32 = 2.0**-24


def make_inputs(case, seed, base, factor, numerics):
    tokens, heads, hd, p = case
    x = arrays((tokens, heads, hd), seed)
    cos, sin = rope_tables(p, hd, base, factor)
    # Arbitrary position ids: unsorted, repeated.
    pos = np.random.default_rng(seed + 1).integers(0, p, tokens).astype(np.int32)
    if numerics == "bf16":  # the device holds x and the tables in bf16, as HF casts cos/sin
        cos, sin = round_bf16(cos), round_bf16(sin)
    return x, cos, sin, pos


def magnitude(x, cos, sin, pos):
    """sum of |terms| of each output: |x * cos| + |rotate_half(x) * sin|."""
    g = np.abs(x.astype(np.float64))
    return g * np.abs(cos[pos])[:, None, :] + np.abs(rotate_half(g)) * np.abs(sin[pos])[:, None, :]


def roofline_moved(rep, cfg):
    return max(rep.flops / cfg.peak_flops_per_cycle, rep.dram_bytes / cfg.dram_bytes_per_cycle)


def run_both(cfg, numerics, *inputs, **consts):
    results = [NPU(cfg, mode=m, numerics=numerics).run(rope, *inputs, **consts) for m in ("tile", "fast")]
    return [r[0] for r in results], [r[1] for r in results]


@settings(max_examples=30, deadline=None)
@given(
    case=rope_cases(),
    seed=seeds,
    base=st.sampled_from([10000.0, 1e6]),
    factor=st.sampled_from([1.0, 8.0]),
    cfg=chips,
)
def test_fp32_both_modes_equal_numpy_and_each_other(case, seed, base, factor, cfg):
    x, cos, sin, pos = make_inputs(case, seed, base, factor, "fp32")
    ref = rope_reference(x, cos, sin, pos)
    (tile, fast), (rep_tile, rep_fast) = run_both(cfg, "fp32", x, cos, sin, pos)
    # Two products and a sum in fp32: three roundings of terms no larger than the magnitude.
    bound = 3 * U_FP32 * magnitude(x, cos, sin, pos) + 1e-37
    for out in (tile, fast):
        assert out.shape == x.shape
        assert np.all(np.abs(out - ref) <= bound)
    assert rep_tile == rep_fast  # identical cycle reports: same stream, same schedule
    assert rep_tile.flops == 0
    assert rep_tile.cycles >= roofline_moved(rep_tile, cfg)
    assert rep_tile.bytes_by_path["local->dram"] == x.size * 2


@settings(max_examples=15, deadline=None)
@given(case=rope_cases(max_tokens=20), seed=seeds, base=st.sampled_from([10000.0, 1e6]), cfg=chips)
def test_bf16_within_bf16_tolerance(case, seed, base, cfg):
    x, cos, sin, pos = make_inputs(case, seed, base, 8.0, "bf16")
    xr = round_bf16(x)
    ref = rope_reference(xr, cos, sin, pos)
    (tile, fast), _ = run_both(cfg, "bf16", x, cos, sin, pos)
    for out in (tile, fast):
        # fp32 math on bf16 inputs, one rounding to bf16 on the way out: u_bf16 of |out|,
        # which the magnitude bounds (plus the fp32 roundings).
        bound = (U_BF16 + 3 * U_FP32) * magnitude(xr, cos, sin, pos) + 1e-37
        assert np.all(np.abs(out - ref) <= bound)
        np.testing.assert_array_equal(out, round_bf16(out))


@pytest.mark.parametrize(
    "cfg, shape, plan",
    [
        (TINY, (3, 40, 128), None),  # H * hd > vector_max_elements: heads chunked per instruction
        (TINY, (5, 3, 256), RopePlan(gh=1, tt=2, depth=1)),  # single buffered
        (TINY4, (2, 7, 64), RopePlan(gh=3, tt=1)),  # heads over engines (decode)
        (TINY4, (1, 8, 32), None),
        (TINY4, (13, 2, 16), RopePlan(gh=1, tt=3, depth=3)),
    ],
)
def test_plans_and_wide_heads(cfg, shape, plan):
    x, cos, sin, pos = make_inputs((*shape, 64), 5, 1e6, 8.0, "fp32")
    consts = {} if plan is None else {"plan": plan}
    ref = rope_reference(x, cos, sin, pos)
    (tile, fast), (rep_tile, rep_fast) = run_both(cfg, "fp32", x, cos, sin, pos, **consts)
    for out in (tile, fast):
        assert np.all(np.abs(out - ref) <= 3 * U_FP32 * magnitude(x, cos, sin, pos) + 1e-37)
    assert rep_tile == rep_fast


def test_tables_follow_the_formula():
    cos, sin = rope_tables(50, 8, 10000.0, 8.0)
    p, i = np.meshgrid(np.arange(50), np.arange(8), indexing="ij")
    angle = p / (10000.0 ** (2 * (i % 4) / 8) * 8.0)  # emb = concat(freqs, freqs)
    np.testing.assert_allclose(cos, np.cos(angle), atol=64 * U_FP32)
    np.testing.assert_allclose(sin, np.sin(angle), atol=64 * U_FP32)
    assert cos.dtype == sin.dtype == np.float32


def test_matches_hugging_face_gemma3():
    torch = pytest.importorskip("torch")
    modeling = pytest.importorskip("transformers.models.gemma3.modeling_gemma3")
    from transformers import Gemma3TextConfig

    hd, heads, p = 256, 2, 32768
    config = Gemma3TextConfig(
        head_dim=hd,
        hidden_size=128,
        num_attention_heads=heads,
        max_position_embeddings=p,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
        },
    )
    rotary = modeling.Gemma3RotaryEmbedding(config)
    pos = np.array([0, 7, 3, 32767, 7, 1000, 4095], np.int32)
    x = arrays((len(pos), heads, hd), 3)
    q = torch.from_numpy(x).transpose(0, 1)[None]  # HF layout (batch, heads, T, hd)
    for layer_type, base, factor in (("sliding_attention", 1e4, 1.0), ("full_attention", 1e6, 8.0)):
        cos_hf, sin_hf = rotary(q, torch.from_numpy(pos.astype(np.int64))[None], layer_type)
        cos, sin = rope_tables(p, hd, base, factor)
        # Same float32 recipe; 1e-6 allows an ulp of inv_freq times position 32767.
        np.testing.assert_allclose(cos[pos], cos_hf[0].numpy(), atol=2e-6)
        np.testing.assert_allclose(sin[pos], sin_hf[0].numpy(), atol=2e-6)
        q_hf, _ = modeling.apply_rotary_pos_emb(q, q, cos_hf, sin_hf)
        want = q_hf[0].transpose(0, 1).numpy()
        out, _ = NPU(TINY4, mode="tile", numerics="fp32").run(rope, x, cos, sin, pos)
        np.testing.assert_allclose(out, want, atol=4e-6)


def test_positions_out_of_range_are_refused():
    x, cos, sin, _ = make_inputs((3, 1, 8, 10), 0, 1e4, 1.0, "fp32")
    bad = np.array([0, 10, 2], np.int32)
    with pytest.raises(OutOfBoundsError, match="index 10 at row"):
        NPU(TINY, mode="tile").run(rope, x, cos, sin, bad)
    with pytest.raises(KernelError, match=r"positions must lie in \[0, 10\)"):
        NPU(TINY, mode="fast").run(rope, x, cos, sin, bad)


def test_atom_reaches_the_dram_bound():
    # P = T table rows, so the report's compulsory bytes are the rows gathered.
    t, h, hd = 256, 8, 256
    sig = [((t, h, hd), "bf16"), ((t, hd), "bf16"), ((t, hd), "bf16"), ((t,), "int32")]
    rep = NPU("atom").plan(rope, sig, {}).report
    assert rep.dram_bytes == 2 * t * h * hd * 2 + 2 * t * hd * 2 + 4 * t
    assert rep.pct_of_roofline >= 85.0
