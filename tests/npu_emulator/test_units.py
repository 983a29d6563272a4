"""Vector-unit masking (select), argmax, and the indirect DMA (gather), in both modes."""

import math

import numpy as np
import pytest

from npu_emulator import NPU, TINY, DTypeMismatchError, Kernel, OutOfBoundsError


def select_kernel(offset, row_coef, col_coef):
    def emit(k, x):
        out = k.output(x.shape, "fp32")
        t = k.alloc(x.shape, "fp32")
        xt = k.alloc(x.shape)
        k.dma(xt, x, queue=0)
        k.vector("copy", t, xt)
        k.select(t, t, offset=offset, row_coef=row_coef, col_coef=col_coef, fill=-1e30)
        k.dma(out, t, queue=1)
        return out

    return Kernel("select", emit, None)


@pytest.mark.parametrize("q0, k0, window", [(0, 0, None), (5, 0, None), (8, 3, 4), (2, 0, 1)])
def test_select_draws_causal_and_window_edges(q0, k0, window):
    rows, cols = 6, 9
    x = np.ones((rows, cols), np.float32)
    # causal: key k0 + j visible from query q0 + i iff k0 + j <= q0 + i
    kernel = select_kernel(q0 - k0, 1, -1)
    out, rep = NPU(TINY, mode="tile").run(kernel, x)
    qp = q0 + np.arange(rows)[:, None]
    kp = k0 + np.arange(cols)[None, :]
    np.testing.assert_array_equal(out > 0, kp <= qp)
    if window:
        # sliding window: visible iff k > q - window  <=>  (k0 - q0 + window - 1) - i + j >= 0
        out, _ = NPU(TINY, mode="tile").run(select_kernel(k0 - q0 + window - 1, -1, 1), x)
        np.testing.assert_array_equal(out > 0, kp > qp - window)
    assert rep.unit_busy["engine0.vector"] == 2 * (
        TINY.vector_latency + math.ceil(rows * cols / TINY.vector_lanes)
    )


def test_argmax_reduction_gives_first_maximum():
    def emit(k, x):
        out = k.output((x.shape[0], 1), "int32")
        t = k.alloc(x.shape)
        i = k.alloc((x.shape[0], 1), "int32")
        k.dma(t, x, queue=0)
        k.reduce("argmax", i, t)
        k.dma(out, i, queue=1)
        return out

    x = np.array([[1, 5, 5, 2], [-3, -1, -2, -1]], np.float32)
    out, _ = NPU(TINY, mode="tile").run(Kernel("argmax", emit, None), x)
    np.testing.assert_array_equal(out[:, 0], [1, 1])

    def bad(k, x):
        t = k.alloc(x.shape)
        k.reduce("argmax", k.alloc((x.shape[0], 1), "fp32"), t)
        return k.output(x.shape)

    with pytest.raises(DTypeMismatchError, match="argmax writes int32 indices"):
        NPU(TINY).run(Kernel("bad", bad, None), x)


def gather_kernel():
    def emit(k, table, ids):
        n, d = ids.shape[0], table.shape[1]
        out = k.output((n, d))
        idx = k.alloc((n,), "int32")
        rows = k.alloc((n, d))
        k.dma(idx, ids, queue=0)
        k.gather(rows, table, idx, queue=1)
        k.dma(out, rows, queue=2)
        return out

    return Kernel("gather", emit, lambda table, ids: table[ids])


def test_gather_moves_the_indexed_rows_and_costs_their_bytes():
    table = np.random.default_rng(0).standard_normal((50, 12)).astype(np.float32)
    ids = np.array([3, 49, 0, 3, 17], np.int32)
    outs = [NPU(TINY, mode=m, numerics="fp32").run(gather_kernel(), table, ids) for m in ("tile", "fast")]
    for out, _ in outs:
        np.testing.assert_array_equal(out, table[ids])
    rep = outs[0][1]
    assert rep == outs[1][1]
    assert rep.bytes_by_path["dram->local"] == 5 * 4 + 5 * 12 * 2  # ids (int32) + rows (bf16)


def test_gather_index_out_of_range_names_it():
    table = np.zeros((10, 4), np.float32)
    with pytest.raises(OutOfBoundsError, match=r"index 10 at row 1 is outside table 'table' of 10 rows"):
        NPU(TINY, mode="tile").run(gather_kernel(), table, np.array([0, 10], np.int32))


def test_scatter_writes_rows_in_place_of_an_input_tensor():
    def emit(k, cache, new, slots):
        n, d = new.shape
        idx, rows = k.alloc((n,), "int32"), k.alloc((n, d))
        k.dma(idx, slots, queue=0)
        k.dma(rows, new, queue=1)
        k.scatter(cache, idx, rows, queue=2)
        return ()

    def fast(cache, new, slots):
        cache[slots] = new

    npu = {m: NPU(TINY, mode=m, numerics="fp32") for m in ("tile", "fast")}
    reports = []
    for dev in npu.values():
        cache = dev.to_device(np.zeros((8, 3), np.float32), name="cache")
        new = np.arange(6, dtype=np.float32).reshape(2, 3) + 1
        out, rep = dev.run(Kernel("scatter", emit, fast), cache, new, np.array([5, 2], np.int32))
        assert out == ()
        expect = np.zeros((8, 3), np.float32)
        expect[[5, 2]] = new
        np.testing.assert_array_equal(cache.numpy(), expect)
        reports.append(rep)
    assert reports[0] == reports[1]
    assert reports[0].bytes_by_path["local->dram"] == 2 * 3 * 2


def test_unordered_scatters_overlap_and_plain_accesses_still_wait():
    def emit(k, cache, new, slots, *, unordered):
        n, d = new.shape
        half = n // 2
        ids = [k.alloc((half,), "int32", name=f"i{j}") for j in range(2)]
        rows = [k.alloc((half, d), name=f"r{j}") for j in range(2)]
        for j in range(2):
            k.dma(ids[j], slots[j * half : (j + 1) * half], queue=2 * j)
            k.dma(rows[j], new[j * half : (j + 1) * half], queue=2 * j + 1)
        for j in range(2):
            k.scatter(cache, ids[j], rows[j], queue=2 * j, unordered=unordered)
        back = k.alloc((4, d), name="back")
        k.dma(back, cache[0:4], queue=1)  # a plain read of the cache: after both scatters
        out = k.output((4, d))
        k.dma(out, back, queue=3)
        k.set_roofline_bytes(new.size * 2 * 2)
        return out

    cache = np.zeros((64, 32), np.float32)
    new = np.ones((16, 32), np.float32)
    slots = np.arange(16, dtype=np.int32) * 4 % 64
    reports = {}
    for unordered in (False, True):
        out, rep = NPU(TINY, mode="tile").run(
            Kernel("sc", emit, None), cache, new, slots, unordered=unordered
        )
        np.testing.assert_array_equal(out[0], 1.0)  # row 0 was scattered before the read
        s, sched = rep.stream, rep.schedule
        sc = [i for i, op in enumerate(s.ops) if op == "scatter"]
        read = next(i for i, lab in enumerate(s.labels) if "-> back" in lab)
        assert sched.start[read] >= max(sched.end[i] for i in sc)
        overlap = sched.start[sc[1]] < sched.end[sc[0]]
        assert overlap == unordered
        reports[unordered] = rep
        assert rep.io_bytes == 16 * 32 * 4
    assert reports[True].cycles < reports[False].cycles


def test_to_device_copies_the_host_array():
    npu = NPU(TINY, numerics="fp32")
    host = np.zeros((4, 4), np.float32)
    a, b = npu.to_device(host, name="a"), npu.to_device(host, name="b")
    a.numpy()[0, 0] = 1.0
    host[1, 1] = 2.0
    assert b.numpy()[0, 0] == 0.0 and a.numpy()[1, 1] == 0.0
