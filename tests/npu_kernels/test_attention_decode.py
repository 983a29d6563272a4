import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npu_emulator import NPU, TINY, KernelError, round_bf16
from npu_emulator.dma import RES_DRAM
from npu_kernels.attention_decode import (
    attention_decode,
    attention_decode_reference,
    decode_kv_tile,
    decode_plan,
)
from tests.strategies import TINY4, arrays, chips, decode_shapes, seeds

# On TINY4 the KV length is split over engines and the partials are combined on device at
# test sizes.

U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
U_FP32 = 2.0**-24


def masks(b, length, seed, kind, neg):
    """Additive masks the host builds: random holes, left padding, a sliding window, a ring
    buffer's valid slots. Every row keeps at least one visible slot."""
    rng = np.random.default_rng(seed)
    visible = np.ones((b, length), bool)
    for i in range(b):
        if kind == "random":
            visible[i] = rng.random(length) < rng.uniform(0.2, 1.0)
        elif kind == "left_pad":  # positions [pad, L) hold this sequence's tokens
            visible[i, : rng.integers(0, length)] = False
        elif kind == "window":  # only the last w positions are within the window
            visible[i, : length - rng.integers(1, length + 1)] = False
        elif kind == "ring":  # slots written so far, counted from a rotating start
            start, used = rng.integers(0, length), rng.integers(1, length + 1)
            visible[i] = ((np.arange(length) - start) % length) < used
        visible[i, rng.integers(0, length)] = True
    return np.where(visible, 0.0, neg).astype(np.float32)


def make_inputs(shape, seed, kind="random", neg=-np.inf):
    b, hkv, group, hd, n_tiles, extra = shape
    length = n_tiles * decode_kv_tile(TINY)
    s_len = length + extra
    q = arrays((b, hkv * group, hd), seed)
    kc = arrays((b, hkv, s_len, hd), seed + 1)
    vc = arrays((b, hkv, s_len, hd), seed + 2)
    return q, kc, vc, masks(b, length, seed + 3, kind, neg), hd**-0.5


def run(cfg, mode, numerics, q, kc, vc, mask, scale):
    npu = NPU(cfg, mode=mode, numerics=numerics)
    return npu.run(attention_decode, q, kc, vc, npu.to_device(mask, "fp32", name="mask"), scale=scale)


def magnitudes(q, kc, mask, scale):
    """Per (b, h): the largest sum |q||k| over visible slots (it scales the score rounding)."""
    b, hq, hd = q.shape
    hkv, length = kc.shape[1], mask.shape[1]
    qa = np.abs(q.astype(np.float64)).reshape(b, hkv, hq // hkv, hd)
    ka = np.abs(kc[:, :, :length].astype(np.float64))
    dots = scale * qa @ ka.swapaxes(-1, -2)
    dots = np.where(mask[:, None, None, :] == 0, dots, 0.0)
    return dots.max(axis=-1).reshape(b, hq)


def vmax(vc, hq, length):
    b, hkv = vc.shape[:2]
    m = np.abs(vc[:, :, :length]).max(axis=(2, 3))  # (B, Hkv)
    return np.repeat(m, hq // hkv, axis=1)  # (B, Hq)


def roofline_moved(rep, cfg):
    return max(rep.flops / cfg.peak_flops_per_cycle, rep.dram_bytes / cfg.dram_bytes_per_cycle)


def check_fp32(shape, seed, cfg, kind="random", neg=-np.inf):
    q, kc, vc, mask, scale = make_inputs(shape, seed, kind, neg)
    b, hq, hd = q.shape
    length = mask.shape[1]
    ref = attention_decode_reference(q, kc, vc, mask, scale=scale)
    # fp32 everywhere: a score's error is ~hd u |q||k| (dot product) and moves its weight by as
    # much relatively; exp, the sums over L slots and the normalisation add ~L u. The output is
    # an average of v, so both scale with max |v|. A factor 4 covers the constants.
    tol = 4 * U_FP32 * (2 * hd * magnitudes(q, kc, mask, scale) + 4 * length + 8) * vmax(vc, hq, length)
    reports = []
    for mode in ("tile", "fast"):
        out, rep = run(cfg, mode, "fp32", q, kc, vc, mask, scale)
        assert out.shape == (b, hq, hd)
        assert np.all(np.abs(out - ref) <= tol[..., None] + 1e-30), mode
        reports.append(rep)
    tile, fast = reports
    assert tile == fast  # identical cycle reports: same stream, same schedule
    assert tile.flops == 4 * b * hq * length * hd
    assert tile.io_bytes == tile.dram_bytes  # the declared roofline bytes are what moved
    assert tile.cycles >= roofline_moved(tile, cfg)


@settings(max_examples=60, deadline=None)
@given(
    shape=decode_shapes(),
    seed=seeds,
    cfg=chips,
    kind=st.sampled_from(["random", "left_pad", "window", "ring"]),
)
def test_fp32_both_modes_equal_numpy_and_each_other(shape, seed, cfg, kind):
    check_fp32(shape, seed, cfg, kind)


@pytest.mark.parametrize(
    "shape",
    [
        (1, 1, 1, 8, 1, 0),  # a single head, one tile
        (1, 1, 8, 65, 5, 3),  # MQA, hd over the matmul limit, L split over 4 engines
        (2, 3, 2, 17, 2, 1),  # GQA 2, more (b, g) than engines
        (1, 2, 1, 9, 7, 0),  # MHA, uneven split of 14 tiles over 4 engines
    ],
)
@pytest.mark.parametrize("cfg", [TINY, TINY4], ids=["tiny", "tiny4"])
def test_fp32_named_shapes(shape, cfg):
    check_fp32(shape, 7, cfg)


@pytest.mark.parametrize("neg", [-np.inf, -1e30])
def test_fully_masked_pieces_contribute_nothing(neg):
    # Left padding over the first 3/4 of L: on TINY4 three engines see only masked slots.
    shape = (2, 1, 2, 16, 8, 0)
    q, kc, vc, _, scale = make_inputs(shape, 3)
    mask = np.zeros((2, 64), np.float32)
    mask[:, :48] = neg
    ref = attention_decode_reference(q, kc, vc, mask, scale=scale)
    for mode in ("tile", "fast"):
        out, _ = run(TINY4, mode, "fp32", q, kc, vc, mask, scale)
        assert np.all(np.isfinite(out))
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(shape=decode_shapes(max_tiles=4), seed=seeds, cfg=chips)
def test_bf16_within_bf16_tolerance(shape, seed, cfg):
    q, kc, vc, mask, scale = make_inputs(shape, seed)
    hq, length = q.shape[1], mask.shape[1]
    # Inputs are rounded to bf16 on the way in; compare against the math on those values.
    ref = attention_decode_reference(round_bf16(q), round_bf16(kc), round_bf16(vc), mask, scale=scale)
    # Scores stay fp32 (bf16 products are exact in fp32). The tile program rounds the weights
    # P to bf16 (relative u each; l sums the rounded weights, so the average stays consistent:
    # 2u of max |v|) and the output once more (u): 3u of max |v|, plus the fp32 terms.
    tol = (3 * U_BF16 + 64 * U_FP32 * (length + 4 * q.shape[2])) * vmax(round_bf16(vc), hq, length)
    for mode in ("tile", "fast"):
        out, _ = run(cfg, mode, "bf16", q, kc, vc, mask, scale)
        assert np.all(np.abs(out - ref) <= tol[..., None] + 1e-30), mode
        np.testing.assert_array_equal(out, round_bf16(out))  # what a bf16 tensor holds


def test_slots_from_L_on_are_never_read():
    # A ring buffer smaller than the cache, or a global cache filled up to L: NaN past L.
    q, kc, vc, mask, scale = make_inputs((2, 2, 2, 16, 3, 9), 11)
    kc[:, :, 24:] = np.nan
    vc[:, :, 24:] = np.nan
    ref = attention_decode_reference(q, kc, vc, mask, scale=scale)
    for cfg in (TINY, TINY4):
        for mode in ("tile", "fast"):
            out, _ = run(cfg, mode, "fp32", q, kc, vc, mask, scale)
            np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(shape=decode_shapes(max_tiles=8), cfg=chips)
def test_dram_traffic_is_the_L_slots_once(shape, cfg):
    b, hkv, group, hd, n_tiles, extra = shape
    length = n_tiles * decode_kv_tile(cfg)
    s_len, hq = length + extra, hkv * group
    sig = [
        ((b, hq, hd), "bf16"),
        ((b, hkv, s_len, hd), "bf16"),
        ((b, hkv, s_len, hd), "bf16"),
        ((b, length), "fp32"),
    ]
    rep = NPU(cfg).plan(attention_decode, sig, {"scale": 0.125}).report
    s = rep.stream
    dram = s.is_dma & ((s.res & RES_DRAM) != 0)
    assert rep.dram_bytes == s.nbytes[dram].sum()
    # K and V slots [0, L) once each, q once (shared SRAM when engines share a kv head), the
    # mask once, the output once; partials move between engines without touching DRAM.
    reads = 2 * b * hkv * length * hd * 2 + b * hq * hd * 2 + b * length * 4
    assert rep.bytes_by_path.get("dram->local", 0) + rep.bytes_by_path.get("dram->shared", 0) == reads
    assert rep.bytes_by_path["local->dram"] == b * hq * hd * 2
    # The roofline counts those bytes, not the whole (B, Hkv, S, hd) caches.
    assert rep.io_bytes == reads + b * hq * hd * 2 == rep.dram_bytes
    assert max(rep.unit_bounds["matrix"], rep.unit_bounds["dram"]) == roofline_moved(rep, cfg)
    assert rep.cycles >= roofline_moved(rep, cfg)


@pytest.mark.parametrize(
    "hq, hkv, hd, b, length",
    [(4, 1, 256, 1, 512), (4, 1, 256, 1, 4096), (32, 16, 128, 4, 4096)],
    ids=["270m-L512", "270m-L4096", "27b-B4-L4096"],
)
def test_atom_roofline_counts_the_L_slots(hq, hkv, hd, b, length):
    # Gemma 3 shapes on atom: the roofline is the same whatever the cache length S >= L.
    npu = NPU("atom")
    reports = []
    for s_len in (length, 4 * length):
        sig = [
            ((b, hq, hd), "bf16"),
            ((b, hkv, s_len, hd), "bf16"),
            ((b, hkv, s_len, hd), "bf16"),
            ((b, length), "fp32"),
        ]
        reports.append(npu.plan(attention_decode, sig, {"scale": hd**-0.5}).report)
    for rep in reports:
        assert rep.io_bytes == 2 * b * hkv * length * hd * 2 + 2 * b * hq * hd * 2 + b * length * 4
        assert rep.io_bytes == rep.dram_bytes
        assert rep.roofline_cycles == rep.io_bytes / npu.config.dram_bytes_per_cycle  # memory bound
        assert 70 < rep.pct_of_roofline <= 100
    assert reports[0].io_bytes == reports[1].io_bytes


def test_report_depends_only_on_shapes():
    shape = (1, 1, 4, 16, 6, 2)
    reports = []
    for seed, kind in ((1, "random"), (2, "window")):
        q, kc, vc, mask, scale = make_inputs(shape, seed, kind)
        reports.append(run(TINY4, "tile", "fp32", q, kc, vc, mask, scale)[1])
    assert reports[0] == reports[1]


def test_long_segments_are_cut_into_pieces_and_combined():
    # 16 KiB of local SRAM holds pieces of at most a few tiles: one engine combines its own.
    small = TINY.replace(name="tiny-small-sram", local_sram_bytes=16 * 1024)
    shape = (1, 1, 2, 16, 20, 0)
    plan = decode_plan(small, 1, 1, 2, 16, 160, 2, 4)
    assert len(plan.pieces[0]) >= 2
    check_fp32(shape, 5, small)


def test_length_not_a_multiple_of_the_kv_tile_is_refused():
    tile = decode_kv_tile(TINY)
    q, kc, vc = arrays((1, 2, 8), 0), arrays((1, 1, 40, 8), 1), arrays((1, 1, 40, 8), 2)
    mask = np.zeros((1, tile + 3), np.float32)
    with pytest.raises(KernelError, match=rf"L = {tile + 3} is not a multiple of the KV tile {tile}"):
        run(TINY, "fast", "fp32", q, kc, vc, mask, 0.5)
    with pytest.raises(KernelError, match="must be in"):
        run(TINY, "fast", "fp32", q, kc, vc, np.zeros((1, 48), np.float32), 0.5)  # L > S


def test_kv_tile_is_one_mac_block():
    assert decode_kv_tile(TINY) == TINY.mac_rows
    assert math.gcd(512, decode_kv_tile(NPU("atom").config)) == decode_kv_tile(NPU("atom").config)


def ring_mask(positions, slots, length, window):
    """The host's mask over slots [0, L) of a ring of ``slots`` slots after each sequence wrote
    positions 0..pos at slot p % slots, one by one: visible where a slot holds a position in
    (pos - window, pos]."""
    mask = np.full((len(positions), length), -np.inf, np.float32)
    for b, pos in enumerate(positions):
        held = np.full(slots, -1)
        for p in range(pos + 1):
            held[p % slots] = p
        mask[b, (held[:length] >= 0) & (held[:length] > pos - window)] = 0.0
    return mask


@pytest.mark.parametrize(
    "window, positions",
    [(1, [0, 37]), (3, [2, 21]), (5, [4, 100]), (63, [40, 200]), (65, [64, 300]), (100, [99, 250])],
)
@pytest.mark.parametrize("cfg", [TINY, TINY4], ids=["tiny", "tiny4"])
def test_a_ring_of_any_window_rounded_up_to_whole_tiles(window, positions, cfg):
    """Windows off the KV tile in a ring of ceil(window / tile) tiles, wrapped or not yet
    full: both modes equal the reference, report the same cycles, and read whole tiles."""
    tile = decode_kv_tile(cfg)
    slots = math.ceil(window / tile) * tile
    length = min(slots, math.ceil((max(positions) + 1) / tile) * tile)
    b, hkv, group, hd = len(positions), 2, 2, 16
    q = arrays((b, hkv * group, hd), 1)
    kc, vc = arrays((b, hkv, slots, hd), 2), arrays((b, hkv, slots, hd), 3)
    mask, scale = ring_mask(positions, slots, length, window), hd**-0.5
    assert ((mask == 0).sum(axis=1) == np.minimum(window, np.array(positions) + 1)).all()
    ref = attention_decode_reference(q, kc, vc, mask, scale=scale)
    tol = (
        4
        * U_FP32
        * (2 * hd * magnitudes(q, kc, mask, scale) + 4 * length + 8)
        * vmax(vc, hkv * group, length)
    )
    reports = []
    for mode in ("tile", "fast"):
        out, rep = run(cfg, mode, "fp32", q, kc, vc, mask, scale)
        assert np.all(np.abs(out - ref) <= tol[..., None] + 1e-30), mode
        reports.append(rep)
    assert reports[0] == reports[1]
    # K and V of L slots, whole tiles, each once (bf16 timing), then q, the fp32 mask and out.
    kv = 2 * b * hkv * length * hd * 2
    assert reports[0].io_bytes == kv + 2 * b * hkv * group * hd * 2 + b * length * 4 == reports[0].dram_bytes
