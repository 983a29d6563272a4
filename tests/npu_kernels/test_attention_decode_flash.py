import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npu_emulator import NPU, TINY, KernelError, round_bf16
from npu_kernels.attention_decode import (
    attention_decode,
    attention_decode_reference,
    decode_kv_tile,
    decode_plan,
)
from npu_kernels.attention_decode_flash import (
    attention_decode_flash,
    attention_decode_flash_reference,
    flash_decode_length,
)
from tests.npu_kernels.test_attention_decode import U_BF16, U_FP32, magnitudes, masks, roofline_moved, vmax
from tests.strategies import TINY4, arrays, chips, flash_decode_shapes, seeds


def make_inputs(shape, seed, cfg, kind="random", neg=-np.inf):
    b, hkv, group, hd, part_tiles, parts, extra = shape
    partition = part_tiles * decode_kv_tile(cfg)
    length = parts * partition
    q = arrays((b, hkv * group, hd), seed)
    kc = arrays((b, hkv, length + extra, hd), seed + 1)
    vc = arrays((b, hkv, length + extra, hd), seed + 2)
    return q, kc, vc, masks(b, length, seed + 3, kind, neg), hd**-0.5, partition


def run(cfg, mode, numerics, kernel, q, kc, vc, mask, scale, **consts):
    npu = NPU(cfg, mode=mode, numerics=numerics)
    return npu.run(kernel, q, kc, vc, npu.to_device(mask, "fp32", name="mask"), scale=scale, **consts)


def fp32_tolerance(q, kc, vc, mask, scale):
    # As attention_decode's (tests/npu_kernels/test_attention_decode.py): ~hd u |q||k| per score,
    # ~L u from exp, the sums and the normalisation, all scaled by max |v|; the partition
    # weights exp(m_p - M) add a few u more, inside the factor 4.
    hq, hd, length = q.shape[1], q.shape[2], mask.shape[1]
    return 4 * U_FP32 * (2 * hd * magnitudes(q, kc, mask, scale) + 4 * length + 8) * vmax(vc, hq, length)


def check_fp32(shape, seed, cfg, kind="random", neg=-np.inf):
    q, kc, vc, mask, scale, partition = make_inputs(shape, seed, cfg, kind, neg)
    b, hq, hd = q.shape
    length = mask.shape[1]
    ref = attention_decode_flash_reference(q, kc, vc, mask, scale=scale, partition=partition)
    # The reduction over partitions is softmax attention over their slots (float64 rounding).
    np.testing.assert_allclose(ref, attention_decode_reference(q, kc, vc, mask, scale=scale), atol=1e-12)
    tol = fp32_tolerance(q, kc, vc, mask, scale)[..., None] + 1e-30
    reports = []
    for mode in ("tile", "fast"):
        out, rep = run(cfg, mode, "fp32", attention_decode_flash, q, kc, vc, mask, scale, partition=partition)
        assert out.shape == (b, hq, hd)
        assert np.all(np.abs(out - ref) <= tol), mode
        reports.append(rep)
    tile, fast = reports
    assert tile == fast  # identical cycle reports: same stream, same schedule
    assert tile.flops == 4 * b * hq * length * hd
    # K and V of the live partitions' L slots, q, the mask and out: never the slots past L.
    hkv = kc.shape[1]
    assert tile.io_bytes == 2 * b * hkv * length * hd * 2 + 2 * b * hq * hd * 2 + mask.size * 4
    assert tile.io_bytes == tile.dram_bytes
    assert tile.cycles >= roofline_moved(tile, cfg)
    # The eager kernel over the same slots: the same attention within both roundings.
    eager, _ = run(cfg, "fast", "fp32", attention_decode, q, kc, vc, mask, scale)
    assert np.all(np.abs(out - eager) <= 2 * tol)


@settings(max_examples=40, deadline=None)
@given(
    shape=flash_decode_shapes(),
    seed=seeds,
    cfg=chips,
    kind=st.sampled_from(["random", "left_pad", "window"]),
)
def test_fp32_both_modes_equal_the_reduction_and_eager(shape, seed, cfg, kind):
    check_fp32(shape, seed, cfg, kind)


@pytest.mark.parametrize(
    "shape",
    [
        (1, 1, 1, 8, 1, 1, 0),  # one partition of one tile: no reduction
        (1, 1, 8, 65, 2, 3, 3),  # MQA, hd over the matmul limit, 3 partitions over 4 engines
        (2, 3, 2, 17, 1, 2, 1),  # GQA 2, more (b, g) than engines
        (1, 2, 1, 9, 3, 2, 0),  # partitions of 3 tiles: engine ranges cut inside them
    ],
)
@pytest.mark.parametrize("cfg", [TINY, TINY4], ids=["tiny", "tiny4"])
def test_fp32_named_shapes(shape, cfg):
    check_fp32(shape, 7, cfg)


@settings(max_examples=60, deadline=None)
@given(
    shape=flash_decode_shapes(max_part_tiles=6, max_parts=5),
    cfg=st.sampled_from([TINY, TINY4, TINY.replace(name="tiny-small-sram", local_sram_bytes=16 * 1024)]),
)
def test_every_piece_lies_in_one_partition_and_the_pieces_cover_L_once(shape, cfg):
    b, hkv, group, hd, part_tiles, parts, _ = shape
    partition = part_tiles * decode_kv_tile(cfg)
    length = parts * partition
    try:
        plan = decode_plan(cfg, b, hkv, group, hd, length, 2, 4, partition)
    except KernelError:  # a piece or a combine does not fit this chip's SRAM: refused, named
        return
    covered = np.zeros((b, hkv, length), np.int64)
    for pc in (pc for mine in plan.pieces for pc in mine):
        assert pc.l0 // partition == (pc.l0 + pc.n - 1) // partition, pc
        covered[pc.b, pc.g, pc.l0 : pc.l0 + pc.n] += 1
    assert (covered == 1).all()


def test_pieces_cut_by_sram_and_by_partitions_are_combined():
    # 16 KiB of local SRAM holds pieces of at most 112 slots: partitions of 20 tiles (160 slots)
    # are cut in two, so one engine combines four pieces of two partitions.
    small = TINY.replace(name="tiny-small-sram", local_sram_bytes=16 * 1024)
    tile = decode_kv_tile(small)
    plan = decode_plan(small, 1, 1, 2, 16, 40 * tile, 2, 4, 20 * tile)
    assert [(pc.l0, pc.n) for pc in plan.pieces[0]] == [(0, 80), (80, 80), (160, 80), (240, 80)]
    check_fp32((1, 1, 2, 16, 20, 2, 0), 5, small)


@settings(max_examples=20, deadline=None)
@given(shape=flash_decode_shapes(max_part_tiles=2), seed=seeds, cfg=chips)
def test_bf16_within_bf16_tolerance(shape, seed, cfg):
    q, kc, vc, mask, scale, partition = make_inputs(shape, seed, cfg)
    hq, length = q.shape[1], mask.shape[1]
    ref = attention_decode_reference(round_bf16(q), round_bf16(kc), round_bf16(vc), mask, scale=scale)
    # As attention_decode's: P rounded to bf16 (2u of max |v|), the output once more (u).
    tol = (3 * U_BF16 + 64 * U_FP32 * (length + 4 * q.shape[2])) * vmax(round_bf16(vc), hq, length)
    for mode in ("tile", "fast"):
        out, _ = run(cfg, mode, "bf16", attention_decode_flash, q, kc, vc, mask, scale, partition=partition)
        assert np.all(np.abs(out - ref) <= tol[..., None] + 1e-30), mode
        np.testing.assert_array_equal(out, round_bf16(out))


@pytest.mark.parametrize("neg", [-np.inf, -1e30])
def test_fully_masked_partitions_contribute_nothing(neg):
    # Left padding over the first two of three partitions: their m is the floor, their weight 0.
    shape = (2, 1, 2, 16, 2, 3, 0)
    q, kc, vc, _, scale, partition = make_inputs(shape, 3, TINY4)
    mask = np.zeros((2, 3 * partition), np.float32)
    mask[:, : 2 * partition + 3] = neg
    ref = attention_decode_reference(q, kc, vc, mask, scale=scale)
    for mode in ("tile", "fast"):
        out, _ = run(TINY4, mode, "fp32", attention_decode_flash, q, kc, vc, mask, scale, partition=partition)
        assert np.all(np.isfinite(out))
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_cost_moves_in_whole_partitions():
    # A cache of 4 partitions: a step reads the live ones only, and its cycles grow with them.
    tile = decode_kv_tile(TINY4)
    partition, slots = 4 * tile, 16 * tile
    npu = NPU(TINY4)
    cache = ((1, 1, slots, 16), "bf16")
    cycles = []
    for reach in (1, partition, partition + 1, 3 * partition, slots):
        length = flash_decode_length(reach, partition, slots)
        assert length % partition == 0 and reach <= length < reach + partition
        sig = [((1, 4, 16), "bf16"), cache, cache, ((1, length), "bf16")]
        cycles.append(
            npu.plan(attention_decode_flash, sig, {"scale": 0.25, "partition": partition}).report.cycles
        )
    assert cycles[0] == cycles[1] < cycles[2] < cycles[3] < cycles[4]


def test_a_partition_off_the_kv_tile_or_not_dividing_L_is_refused():
    tile = decode_kv_tile(TINY)
    q, kc, vc = arrays((1, 2, 8), 0), arrays((1, 1, 64, 8), 1), arrays((1, 1, 64, 8), 2)
    mask = np.zeros((1, 4 * tile), np.float32)
    with pytest.raises(
        KernelError, match=rf"partition {tile + 1} must be a positive multiple of the KV tile {tile}"
    ):
        run(TINY, "fast", "fp32", attention_decode_flash, q, kc, vc, mask, 0.5, partition=tile + 1)
    with pytest.raises(
        KernelError, match=rf"L = {4 * tile} slots is not a whole number of partitions of {3 * tile}"
    ):
        run(TINY, "tile", "fp32", attention_decode_flash, q, kc, vc, mask, 0.5, partition=3 * tile)
