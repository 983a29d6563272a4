import numpy as np
import pytest
from hypothesis import given, settings

from npu_emulator import NPU, TINY, KernelError, round_bf16
from npu_kernels.attention_prefill import (
    attention_prefill,
    attention_prefill_reference,
    compulsory_bytes,
    geometry,
    visible_flops,
)
from tests.strategies import TINY4, arrays, chips, prefill_cases, seeds

# On TINY4 work splits over engines, and kv heads read by several engines are staged through
# shared SRAM, at test sizes.

U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
U_FP32 = 2.0**-24


def make_case(spec, seed):
    """Arrays and constants for spec = (T, Hq, Hkv, hd, B, S, consts)."""
    T, Hq, Hkv, hd, B, S, consts = spec
    q = arrays((T, Hq, hd), seed)
    k_new, v_new = arrays((T, Hkv, hd), seed + 1), arrays((T, Hkv, hd), seed + 2)
    k_cache, v_cache = arrays((B, Hkv, S, hd), seed + 3), arrays((B, Hkv, S, hd), seed + 4)
    return (q, k_new, v_new, k_cache, v_cache), dict(consts, scale=hd**-0.5)


def valid(spec) -> bool:
    T, Hq, Hkv, hd, B, S, c = spec
    try:
        geometry((T, Hq, hd), (T, Hkv, hd), (B, Hkv, S, hd), **c)
    except KernelError:
        return False
    return True


# The kernel refuses some drawn calls (ring and cache rules): keep the ones it accepts.
valid_cases = prefill_cases().filter(valid)


def fp32_tolerance(ins, consts):
    """Scores carry |error| <= scale * hd * u * sum |q||k| (an fp32 dot product of hd terms);
    exp turns that into a relative error of each weight (twice: numerator and sum), and the
    weighted sum of n values adds n * u. Twice that bound, times the largest |v|."""
    q, k_new, _, k_cache, v_cache = ins
    v_max = max(np.abs(ins[2]).max(), np.abs(v_cache).max())
    keys = np.concatenate([k_cache.reshape(-1, q.shape[-1]), k_new.reshape(-1, q.shape[-1])])
    qk = np.abs(q.reshape(-1, q.shape[-1])).astype(np.float64) @ np.abs(keys).T.astype(np.float64)
    ds = consts["scale"] * q.shape[-1] * U_FP32 * qk.max()
    n = keys.shape[0]
    return 2 * (2 * ds + (n + 8) * U_FP32) * v_max + 1e-30


def run_both(cfg, ins, consts, numerics):
    outs, reps = [], []
    for mode in ("tile", "fast"):
        out, rep = NPU(cfg, mode=mode, numerics=numerics).run(attention_prefill, *ins, **consts)
        outs.append(out)
        reps.append(rep)
    return outs, reps


def check_fp32(spec, seed, cfg):
    ins, consts = make_case(spec, seed)
    ref = attention_prefill_reference(*ins, **consts)
    tol = fp32_tolerance(ins, consts)
    (tile, fast), (rep_tile, rep_fast) = run_both(cfg, ins, consts, "fp32")
    assert tile.shape == fast.shape == ref.shape
    assert np.abs(tile - ref).max() <= tol
    assert np.abs(fast - ref).max() <= tol
    assert rep_tile == rep_fast  # identical cycle reports: same stream, same schedule
    roof = max(rep_tile.flops / cfg.peak_flops_per_cycle, rep_tile.dram_bytes / cfg.dram_bytes_per_cycle)
    assert rep_tile.cycles >= roof
    T, Hq, Hkv, hd, B, S, c = spec
    geo = geometry((T, Hq, hd), (T, Hkv, hd), (B, Hkv, S, hd), **c)
    assert rep_tile.flops >= visible_flops(geo)  # the emitted tiles cover every visible pair


@settings(max_examples=100, deadline=None)
@given(spec=valid_cases, seed=seeds, cfg=chips)
def test_fp32_tile_and_fast_equal_reference_and_each_other(spec, seed, cfg):
    check_fp32(spec, seed, cfg)


@settings(max_examples=40, deadline=None)
@given(spec=valid_cases, seed=seeds, cfg=chips)
def test_bf16_within_bf16_tolerance(spec, seed, cfg):
    ins, consts = make_case(spec, seed)
    # The device holds bf16 inputs: compare against the reference on the rounded values.
    ref = attention_prefill_reference(*(round_bf16(x) for x in ins), **consts)
    (tile, fast), (rep_tile, rep_fast) = run_both(cfg, ins, consts, "bf16")
    # Each weight p is rounded to bf16 before P @ V and the row sum adds the rounded p, so the
    # normalised weights carry <= 2u relative error (<= 2u * max|v| on the output); the output
    # is rounded once more (u * |out| <= u * max|v|). fp32 work adds far less than that.
    v_max = max(np.abs(round_bf16(ins[2])).max(), np.abs(round_bf16(ins[4])).max())
    tol = 3 * U_BF16 * v_max + fp32_tolerance(ins, consts)
    for out in (tile, fast):
        assert np.abs(out - ref).max() <= tol
        np.testing.assert_array_equal(out, round_bf16(out))  # what a bf16 tensor holds
    assert rep_tile == rep_fast


# The masks the task names, each against the reference (fp32, tile and fast, both chips).
# spec = (T, Hq, Hkv, hd, B, S, consts without scale)
NAMED = {
    "causal, no cache": (9, 2, 1, 16, 1, 16, dict(q_start=0)),
    "causal after a cache": (7, 2, 2, 16, 2, 20, dict(q_start=11, batch=1)),
    "window smaller than the sequence": (12, 2, 1, 9, 1, 16, dict(q_start=0, window=5)),
    "window larger than the sequence": (6, 2, 1, 9, 1, 16, dict(q_start=0, window=30)),
    "ring: chunk straddles the window edge": (9, 4, 2, 12, 1, 8, dict(q_start=13, window=8, ring=True)),
    "global cache: chunk straddles the window edge": (9, 2, 1, 12, 1, 24, dict(q_start=13, window=8)),
    "ring wraps, window one more than the ring": (5, 2, 1, 8, 1, 6, dict(q_start=9, window=7, ring=True)),
    "image block straddles the chunk's start": (
        10,
        2,
        1,
        16,
        1,
        20,
        dict(q_start=6, image_blocks=((3, 11),)),
    ),
    "image block inside the chunk": (12, 2, 1, 16, 1, 8, dict(q_start=4, image_blocks=((7, 12),))),
    "image longer than the window (docstring picture)": (
        6,
        2,
        1,
        8,
        1,
        4,
        dict(q_start=4, window=3, ring=True, image_blocks=((5, 9),)),
    ),
    "image longer than the window, padded ring wrapped": (
        12,
        4,
        2,
        16,
        1,
        8,
        dict(q_start=29, window=5, ring=True, image_blocks=((31, 41),)),
    ),
    "window 1: each query sees itself (and later keys of its image)": (
        9,
        2,
        1,
        8,
        1,
        8,
        dict(q_start=13, window=1, ring=True, image_blocks=((15, 19),)),
    ),
    "odd window, ring padded to whole tiles, chunk laps it": (
        20,
        2,
        1,
        12,
        1,
        8,
        dict(q_start=37, window=3, ring=True),
    ),
    "image block longer than the window": (
        14,
        2,
        1,
        8,
        1,
        16,
        dict(q_start=2, window=3, image_blocks=((4, 13),)),
    ),
    "GQA 1": (5, 3, 3, 20, 1, 8, dict(q_start=3)),
    "GQA 2": (5, 4, 2, 20, 1, 8, dict(q_start=3, window=4, ring=False)),
    "GQA 8": (6, 8, 1, 20, 1, 8, dict(q_start=5, window=6, ring=True)),
    "GQA 8 on two kv heads": (4, 16, 2, 10, 1, 8, dict(q_start=2)),
    "hd off every tile": (4, 2, 1, 71, 1, 8, dict(q_start=3)),
    "hd above matmul_max_k": (3, 2, 1, 130, 1, 4, dict(q_start=2)),
    "T = 1 after a cache": (1, 4, 2, 16, 1, 12, dict(q_start=10)),
    "T = 1, nothing cached": (1, 2, 1, 16, 1, 4, dict(q_start=0)),
    "long chunk, many key tiles": (40, 2, 1, 8, 1, 100, dict(q_start=90, window=70)),
}


@pytest.mark.parametrize("cfg", [TINY, TINY4], ids=lambda c: c.name)
@pytest.mark.parametrize("name", list(NAMED))
def test_named_masks(name, cfg):
    spec = NAMED[name]
    assert valid(spec)
    check_fp32(spec, 7, cfg)


def test_reference_by_hand():
    """One query that sees only itself returns its own value; one that sees two equal-score
    keys returns their mean."""
    ins, consts = make_case((1, 2, 1, 4, 1, 4, dict(q_start=0)), 3)
    out = attention_prefill_reference(*ins, **consts)
    np.testing.assert_allclose(out[0, 0], ins[2][0, 0])
    np.testing.assert_allclose(out[0, 1], ins[2][0, 0])
    q, k_new, v_new, k_cache, v_cache = ins
    k_cache[0, 0, 0] = k_new[0, 0]  # position 0 (cached) and 1 (new): the same key
    out = attention_prefill_reference(q[:1], k_new[:1], v_new[:1], k_cache, v_cache, q_start=1, scale=1.0)
    mean = (v_cache[0, 0, 0].astype(np.float64) + v_new[0, 0]) / 2
    np.testing.assert_allclose(out[0, 0], mean, rtol=1e-12)


PICTURE = [  # the module docstring's mask: q_start 4, T 6, window 3, image block [5, 9)
    "..xx|x.....",
    "...x|xxxxx.",
    "....|xxxxx.",
    "....|.xxxx.",
    "....|..xxx.",
    "....|...xxx",
]


@pytest.mark.parametrize("how", ["reference", "tile", "fast"])
def test_docstring_picture_an_image_longer_than_the_window_is_windowed(how):
    """Zero queries weigh the visible keys equally; values one-hot in the key position make
    the output row the visible set over its size (transformers' AND(window, OR(causal, block)))."""
    q_start, T, hd = 4, 6, 10  # hd: one value column per key position 0..9
    eye = np.eye(hd, dtype=np.float32)
    q = np.zeros((T, 1, hd), np.float32)
    k_new, v_new = np.zeros((T, 1, hd), np.float32), eye[q_start:, None, :]
    k_cache, v_cache = np.zeros((1, 1, 4, hd), np.float32), eye[None, None, :q_start]
    consts = dict(q_start=q_start, scale=1.0, window=3, ring=True, image_blocks=((5, 9),))
    ins = (q, k_new, v_new, k_cache, v_cache)
    if how == "reference":
        out = attention_prefill_reference(*ins, **consts)
    else:
        out, _ = NPU(TINY, mode=how, numerics="fp32").run(attention_prefill, *ins, **consts)
    want = np.array([[c == "x" for c in row.replace("|", "")] for row in PICTURE])
    np.testing.assert_allclose(out[:, 0], want / want.sum(axis=1, keepdims=True), atol=1e-6)


def signature(T, Hq, Hkv, hd, S):
    return [((T, Hq, hd), "bf16"), ((T, Hkv, hd), "bf16"), ((T, Hkv, hd), "bf16")] + [
        ((1, Hkv, S, hd), "bf16")
    ] * 2


@pytest.mark.parametrize("cfg", [TINY, TINY4], ids=lambda c: c.name)
def test_sliding_window_skips_masked_tiles(cfg):
    """Far past the window, a sliding layer computes and reads only the window's tiles."""
    T, Hq, Hkv, hd, q_start, w = 16, 2, 1, 32, 200, 16
    npu = NPU(cfg)
    glob = npu.plan(
        attention_prefill, signature(T, Hq, Hkv, hd, 256), dict(q_start=q_start, scale=0.1)
    ).report
    ring = npu.plan(
        attention_prefill, signature(T, Hq, Hkv, hd, w), dict(q_start=q_start, scale=0.1, window=w, ring=True)
    )
    # The same window over a global cache: most of the cache is never read.
    flat = npu.plan(
        attention_prefill, signature(T, Hq, Hkv, hd, 256), dict(q_start=q_start, scale=0.1, window=w)
    )
    geo = geometry((T, Hq, hd), (T, Hkv, hd), (1, Hkv, w, hd), q_start=q_start, window=w, ring=True)
    for rep in (ring.report, flat.report):
        assert rep.flops < glob.flops / 4
        assert rep.cycles < glob.cycles / 3
        assert rep.flops <= 3 * visible_flops(geo)  # masked triangles of the edge tiles only
    read = sum(b for p, b in flat.report.bytes_by_path.items() if p.startswith("dram->"))
    whole_caches = 2 * Hkv * 256 * hd * 2  # K and V of the global cache, bf16
    assert read < whole_caches / 3
    # The roofline counts only the window's cache slots: everything compulsory but the output is read.
    flat_geo = geometry((T, Hq, hd), (T, Hkv, hd), (1, Hkv, 256, hd), q_start=q_start, window=w, ring=False)
    assert flat.report.io_bytes == compulsory_bytes(flat_geo)
    assert flat.report.io_bytes - T * Hq * hd * 2 <= read


def test_four_engines_beat_one():
    sig = signature(32, 4, 2, 32, 64)
    consts = dict(q_start=32, scale=0.1)
    one = NPU(TINY).plan(attention_prefill, sig, consts).report
    four = NPU(TINY4).plan(attention_prefill, sig, consts).report
    # TINY4 keeps TINY's DRAM bandwidth, which bounds this shape near 2,560 cycles.
    assert four.cycles < 0.5 * one.cycles


@pytest.mark.parametrize(
    "spec, match",
    [
        ((4, 2, 1, 8, 1, 8, dict(q_start=2, image_blocks=((4, 9),))), "extends past the chunk"),
        ((4, 2, 1, 8, 1, 4, dict(q_start=6, window=6, ring=True)), "ring cache"),
        ((4, 2, 1, 8, 1, 4, dict(q_start=6, ring=True)), "ring cache"),
        ((4, 2, 1, 8, 1, 4, dict(q_start=6)), "q_start"),
        ((4, 3, 2, 8, 1, 4, dict(q_start=0)), "multiple of Hkv"),
        ((4, 2, 1, 8, 1, 8, dict(q_start=0, image_blocks=((1, 3), (2, 4)))), "overlap"),
    ],
)
def test_bad_calls_raise(spec, match):
    ins, consts = make_case(spec, 0)
    with pytest.raises(KernelError, match=match):
        NPU(TINY, mode="tile").run(attention_prefill, *ins, **consts)
    with pytest.raises(KernelError, match=match):
        NPU(TINY, mode="fast").run(attention_prefill, *ins, **consts)


def test_scale_must_be_positive():
    ins, consts = make_case((2, 2, 1, 8, 1, 4, dict(q_start=0)), 0)
    with pytest.raises(KernelError, match="scale"):
        NPU(TINY).run(attention_prefill, *ins, **dict(consts, scale=-1.0))
