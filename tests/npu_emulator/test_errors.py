"""Every error the emulator promises, provoked, with the names and numbers in its message."""

import re

import numpy as np
import pytest

from npu_emulator import (
    NPU,
    TINY,
    AllocationError,
    DTypeMismatchError,
    EmulatorError,
    Kernel,
    KernelError,
    OperandShapeError,
    OutOfBoundsError,
    UninitializedReadError,
)

X = np.ones((8, 8), np.float32)


def run(emit, *inputs, mode="tile"):
    return NPU(TINY, mode=mode).run(Kernel("probe", emit, lambda *a: np.zeros((8, 8))), *inputs)


def test_errors_share_one_base_class():
    for cls in (
        AllocationError,
        OutOfBoundsError,
        OperandShapeError,
        DTypeMismatchError,
        UninitializedReadError,
        KernelError,
    ):
        assert issubclass(cls, EmulatorError)


@pytest.mark.parametrize("mode", ["tile", "fast"])
def test_allocation_past_capacity_names_asked_free_capacity(mode):
    def emit(k, x):
        k.alloc((100, 1024), "fp32", name="small")  # 400 KiB asked of 256 KiB... too big
        return k.output(x.shape)

    cap = TINY.local_sram_bytes
    with pytest.raises(AllocationError) as e:
        run(emit, X, mode=mode)
    msg = str(e.value)
    assert "'small'" in msg and "local SRAM of engine 0" in msg
    assert f"asked {100 * 1024 * 4} B" in msg and f"{cap} B free of {cap} B capacity" in msg


def test_allocation_counts_what_is_already_taken():
    def emit(k, x):
        k.alloc((200, 256), "fp32", name="first")  # 200 KiB
        k.alloc((100, 256), "fp32", name="second")  # 100 KiB: only 56 KiB left
        return k.output(x.shape)

    with pytest.raises(AllocationError, match=r"'second'.*asked 102400 B, 57344 B free of 262144 B"):
        run(emit, X)


def test_dram_capacity_is_enforced():
    npu = NPU(TINY)
    with pytest.raises(AllocationError, match="DRAM"):
        npu.to_device(np.zeros((TINY.dram_bytes // 2 + 1,), np.float32))


def test_dma_region_out_of_bounds_names_shape_offset_strides_size():
    def emit(k, x):
        out = k.output(x.shape)
        t = k.alloc((8, 8), name="tile")
        k.dma(t, x.region(offset=10, shape=(8, 8), strides=(8, 1)), queue=0)
        return out

    with pytest.raises(OutOfBoundsError) as e:
        run(emit, X)
    msg = str(e.value)
    for part in ("'x'", "shape (8, 8)", "offset 10", "strides (8, 1)", "64 elements", "10..73"):
        assert part in msg, (part, msg)


def test_slices_past_the_end_raise_instead_of_clipping():
    def emit(k, x):
        t = k.alloc((8, 8), name="tile")
        k.dma(t[:, 0:4], x[0:8, 6:10], queue=0)
        return k.output(x.shape)

    with pytest.raises(OutOfBoundsError, match=r"'x': slice 6:10 out of bounds for axis 1 of size 8"):
        run(emit, X)


def test_matmul_operand_beyond_unit_limit():
    def emit(k, x):
        a = k.alloc((4, TINY.matmul_max_k + 1), name="a")
        b = k.alloc((TINY.matmul_max_k + 1, 4), name="b")
        acc = k.alloc((4, 4), "fp32", name="acc")
        k.matmul(acc, a, b)
        return k.output(x.shape)

    with pytest.raises(
        OperandShapeError,
        match=rf"K \(contraction\) = {TINY.matmul_max_k + 1} exceeds the unit's limit {TINY.matmul_max_k}",
    ):
        run(emit, X, mode="fast")


def test_vector_operand_beyond_unit_limit_and_bad_shapes():
    n = TINY.vector_max_elements + 1

    def too_big(k, x):
        t = k.alloc((n,), "fp32", name="big")
        k.vector("add", t, t, 1.0)
        return k.output(x.shape)

    with pytest.raises(
        OperandShapeError,
        match=rf"operand elements = {n} exceeds the unit's limit {TINY.vector_max_elements}",
    ):
        run(too_big, X, mode="fast")

    def mismatch(k, x):
        a, b = k.alloc((4, 4), "fp32", name="a"), k.alloc((3, 4), "fp32", name="b")
        k.vector("add", a, a, b)
        return k.output(x.shape)

    with pytest.raises(
        OperandShapeError, match=r"operand b 'b' of shape \(3, 4\) does not broadcast to \(4, 4\)"
    ):
        run(mismatch, X, mode="fast")


def test_dma_rank_and_shape_checks():
    def rank4(k, x):
        t = k.alloc((2, 2, 2, 2), name="t4")
        k.dma(t, x.region(0, (2, 2, 2, 2), (16, 8, 4, 1)), queue=0)
        return k.output(x.shape)

    with pytest.raises(OperandShapeError, match=r"1-D to 3-D region, got rank 4"):
        run(rank4, X, mode="fast")

    def shapes(k, x):
        t = k.alloc((4, 8), name="t")
        k.dma(t, x, queue=0)
        return k.output(x.shape)

    with pytest.raises(OperandShapeError, match=r"'x' region \(8, 8\) and destination 't' region \(4, 8\)"):
        run(shapes, X, mode="fast")


def test_reading_sram_never_written_raises_in_tile_mode():
    def emit(k, x):
        out = k.output(x.shape)
        t = k.alloc((8, 8), name="half")
        k.dma(t[0:4, :], x[0:4, :], queue=0)  # only the top half
        k.dma(out, t, queue=1)
        return out

    with pytest.raises(UninitializedReadError) as e:
        run(emit, X, mode="tile")
    assert "'half'" in str(e.value) and "index (4, 0)" in str(e.value)
    # Fresh SRAM is NaN, so the unwritten half would have shown as NaN.
    # Fast mode runs no values, but its trace tracks written regions: the same error.
    with pytest.raises(UninitializedReadError) as fast:
        run(emit, X, mode="fast")
    assert str(fast.value) == str(e.value)


def test_dtype_mismatch_in_dma_and_matmul():
    def dma_cast(k, x):
        t = k.alloc((8, 8), "fp32", name="f32")
        k.dma(t, x, queue=0)
        return k.output(x.shape)

    with pytest.raises(DTypeMismatchError, match=r"source 'x' is bf16 but destination 'f32' is fp32"):
        run(dma_cast, X, mode="fast")

    def mixed(k, x):
        a, b = k.alloc((4, 4), "bf16", name="a"), k.alloc((4, 4), "fp32", name="b")
        acc = k.alloc((4, 4), "fp32", name="acc")
        k.matmul(acc, a, b)
        return k.output(x.shape)

    with pytest.raises(DTypeMismatchError, match=r"a 'a' is bf16 and b 'b' is fp32"):
        run(mixed, X, mode="fast")

    def bf16_acc(k, x):
        a, b = k.alloc((4, 4), name="a"), k.alloc((4, 4), name="b")
        acc = k.alloc((4, 4), "bf16", name="acc")
        k.matmul(acc, a, b)
        return k.output(x.shape)

    with pytest.raises(
        DTypeMismatchError, match=r"accumulator 'acc' is bf16; the matrix unit accumulates in fp32"
    ):
        run(bf16_acc, X, mode="fast")


def test_kernel_contract_errors():
    def on_shared(k, x):
        s = k.alloc((8, 8), shared=True, name="staged")
        k.vector("copy", s, s)
        return k.output(x.shape)

    with pytest.raises(KernelError, match=r"'staged' is in shared SRAM; compute units read"):
        run(on_shared, X, mode="fast")

    def unwritten(k, x):
        return k.output(x.shape, name="result")

    with pytest.raises(
        KernelError, match=re.escape("left output 'result' (8, 8) unwritten, first at index (0, 0)")
    ):
        run(unwritten, X, mode="tile")

    def no_queue(k, x):
        out = k.output(x.shape)
        k.dma(out, x, queue=TINY.dma_queues)
        return out

    with pytest.raises(KernelError, match=rf"queue {TINY.dma_queues} does not exist"):
        run(no_queue, X, mode="fast")


def test_failed_runs_release_dram():
    npu = NPU(TINY, mode="tile")

    def boom(k, x):
        k.output((1024, 1024), name="big")
        raise OperandShapeError("kernel gave up")

    with pytest.raises(OperandShapeError):
        npu.run(Kernel("boom", boom, None), X)
    assert npu.dram.used == 0
