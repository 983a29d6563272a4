import numpy as np
import pytest

from npu_emulator import OutOfBoundsError
from npu_emulator.memory import DRAM, LOCAL, Allocator, Buffer, extents_overlap, round_bf16


def buf(shape=(8, 16), memory=LOCAL):
    return Buffer("b", memory, shape, "fp32", 0, int(np.prod(shape)) * 4, engine=0)


def test_allocator_aligns_reuses_and_tracks_peak():
    a = Allocator(LOCAL, 1024, 64, "local SRAM of engine 0")
    x, sx = a.allocate("x", (10,), "fp32")  # 40 B -> one 64 B granule
    y, sy = a.allocate("y", (32,), "fp32")  # 128 B
    assert (x, sx, y, sy) == (0, 64, 64, 128)
    a.release(x, sx)
    z, sz = a.allocate("z", (16,), "bf16")  # 32 B fits the hole at 0
    assert (z, sz) == (0, 64)
    assert a.used == 192 and a.peak == 192
    a.release(y, sy)
    a.release(z, sz)
    assert a.free_blocks == [[0, 1024]]


def test_slice_views_map_to_boxes_and_strides():
    b = buf()
    v = b[2:6, 1:16:3]
    assert v.shape == (4, 5) and v.strides == (16, 3) and v.offset == 2 * 16 + 1
    assert v.extent()[0] == "box" and v.extent()[3] == ((2, 6), (1, 14))
    row = b[3]
    assert row.shape == (16,) and row.extent()[3] == ((3, 4), (0, 16))
    # Column blocks of one matrix are disjoint although their linear hulls overlap.
    assert not extents_overlap(b[:, 0:8].extent(), b[:, 8:16].extent())
    assert extents_overlap(b[:, 0:9].extent(), b[:, 8:16].extent())


def test_views_read_and_write_the_values():
    b = buf((4, 6))
    b.data = np.arange(24, dtype=np.float32).reshape(4, 6)
    np.testing.assert_array_equal(b[1:3, ::2].array(), b.data[1:3, ::2])
    np.testing.assert_array_equal(b.region(2, (3, 2), (6, 1)).array(), b.data[0:3, 2:4])


@pytest.mark.parametrize(
    "make",
    [
        lambda b: b[0:9],
        lambda b: b[:, 10:17],
        lambda b: b[8],
        lambda b: b.region(120, (2, 5), (4, 1)),
        lambda b: b.region(-1, (2,), (1,)),
    ],
)
def test_out_of_bounds_views_raise(make):
    with pytest.raises(OutOfBoundsError, match="'b'"):
        make(buf())


def test_bf16_rounding_is_round_to_nearest_even():
    # 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1).
    assert round_bf16(np.float32(1 + 2**-8)) == 1.0
    # 1 + 3 * 2^-8 lies halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even).
    assert round_bf16(np.float32(1 + 3 * 2**-8)) == np.float32(1 + 2**-6)
    assert round_bf16(np.float32(1 + 2**-8 + 2**-20)) == np.float32(1 + 2**-7)
    bits = round_bf16(np.random.default_rng(0).standard_normal(1000).astype(np.float32)).view(np.uint32)
    assert not (bits & 0xFFFF).any()  # only the top 16 bits survive


def test_dram_buffers_report_where_they_live():
    assert buf(memory=DRAM).where == "DRAM"
    assert buf().where == "local SRAM of engine 0"


def test_round_bf16_in_numba_is_ml_dtypes_round_trip():
    """npu_emulator/bf16.py (bit operations, on Numba's threads; memory.round_bf16 uses it for
    large arrays) against ml_dtypes' float32 -> bfloat16 -> float32: ties to even, both signs,
    subnormals, the largest finite values (which round to inf), inf, NaN (any payload)."""
    import ml_dtypes

    from npu_emulator import bf16
    from npu_emulator.memory import PARALLEL_ROUNDING, round_bf16

    special = [0, 0x8000, 0x3F808000, 0x3F818000, 0x3F80FFFF, 0x00008000, 0x00018000, 0x7F7FFFFF]
    special += [0x7F7F8000, 0x7F7F7FFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001]
    special += [0xFFFFFFFF, 0x7FBFFFFF, 0xFF800001]
    rng = np.random.default_rng(3)
    bits = np.concatenate(
        [np.array(special, np.uint32), rng.integers(0, 2**32, 2 * PARALLEL_ROUNDING, np.uint32)]
    )
    x = bits.view(np.float32)
    with np.errstate(invalid="ignore"):  # (ml_dtypes warns casting NaN)
        want = x.astype(ml_dtypes.bfloat16).astype(np.float32)
        assert bf16.round_array(x).tobytes() == want.tobytes()
        assert bf16.round_array(x, bf16=False).tobytes() == x.tobytes()
        assert round_bf16(x).tobytes() == want.tobytes()  # the Numba path
        assert round_bf16(x[:1000]).tobytes() == want[:1000].tobytes()  # ml_dtypes
        strided = x[: 3 * 2**14].reshape(3, 2**14)[:, ::2]  # any shape and strides
        assert bf16.round_array(strided).tobytes() == want[: 3 * 2**14].reshape(3, 2**14)[:, ::2].tobytes()
        assert round_bf16(strided).shape == strided.shape
