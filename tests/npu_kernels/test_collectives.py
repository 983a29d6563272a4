import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npu_emulator import TINY, DeviceGroup, GroupKernel, KernelError
from npu_emulator.config import TINY_LINK
from npu_kernels.collectives import (
    all_gather,
    all_gather_reference,
    all_reduce,
    all_reduce_reference,
    chunk_add_cycles,
    chunks,
    reduce_scatter,
    reduce_scatter_reference,
    ring_all_reduce_cycles,
)
from tests.strategies import arrays, collective_cases, seeds

SWITCH = TINY_LINK.replace(name="tiny-switch", topology="switch")
U_FP32 = 2.0**-24


def run_both(n, kernel, xs, numerics="fp32", link=None, **consts):
    """Outputs and reports of tile and fast mode; both modes must give one report."""
    outs, reps = [], []
    for mode in ("tile", "fast"):
        group = DeviceGroup(TINY, n, link=link, mode=mode, numerics=numerics)
        out, rep = group.run(kernel, xs, **consts)
        outs.append(out)
        reps.append(rep)
    assert reps[0] == reps[1]  # identical cycles, per device and per link
    return outs, reps[0]


def sum_bound(xs):
    """fp32: N - 1 additions in some order, each within one ulp of its partial sum."""
    return len(xs) * U_FP32 * np.sum([np.abs(x) for x in xs], axis=0) + 1e-37


@settings(max_examples=25, deadline=None)
@given(case=collective_cases(), seed=seeds, algorithm=st.sampled_from(["ring", "tree"]))
def test_all_reduce_fp32_both_modes_equal_numpy(case, seed, algorithm):
    n, shape = case
    xs = [arrays(shape, seed + d) for d in range(n)]
    link = SWITCH if algorithm == "tree" else None
    (tile, fast), rep = run_both(n, all_reduce, xs, link=link, algorithm=algorithm)
    ref = all_reduce_reference(xs)
    for d in range(n):
        assert tile[d].shape == shape
        assert np.all(np.abs(tile[d] - ref[d]) <= sum_bound(xs))
        np.testing.assert_array_equal(tile[d], fast[d])  # the same adds in the same order
    assert rep.num_devices == n and rep.cycles > 0


@settings(max_examples=15, deadline=None)
@given(case=collective_cases(max_elements=300), seed=seeds, algorithm=st.sampled_from(["ring", "tree"]))
def test_all_reduce_bf16_fast_rounds_as_tile(case, seed, algorithm):
    n, shape = case
    xs = [arrays(shape, seed + d, 4.0) for d in range(n)]
    link = SWITCH if algorithm == "tree" else None
    (tile, fast), _ = run_both(n, all_reduce, xs, "bf16", link=link, algorithm=algorithm)
    for d in range(n):
        np.testing.assert_array_equal(tile[d], fast[d])


@settings(max_examples=15, deadline=None)
@given(
    case=collective_cases(),
    seed=seeds,
    numerics=st.sampled_from(["fp32", "bf16"]),
    algorithm=st.sampled_from(["ring", "tree"]),
)
def test_reduce_scatter_both_modes(case, seed, numerics, algorithm):
    n, shape = case
    xs = [arrays(shape, seed + d) for d in range(n)]
    link = SWITCH if algorithm == "tree" else None
    if np.prod(shape) < n:
        with pytest.raises(NotImplementedError, match="empty chunk"):
            DeviceGroup(TINY, n).run(reduce_scatter, xs, algorithm=algorithm)
        return
    (tile, fast), _ = run_both(n, reduce_scatter, xs, numerics, link=link, algorithm=algorithm)
    ref = reduce_scatter_reference(xs)
    bound = sum_bound([x.reshape(-1) for x in xs])
    for d, (start, length) in enumerate(chunks(int(np.prod(shape)), n)):
        assert tile[d].shape == (length,)
        np.testing.assert_array_equal(tile[d], fast[d])
        if numerics == "fp32":
            assert np.all(np.abs(tile[d] - ref[d]) <= bound[start : start + length])


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 5), data=st.data(), seed=seeds, algorithm=st.sampled_from(["ring", "tree"]))
def test_all_gather_both_modes_equal_numpy(n, data, seed, algorithm):
    # Shards of different sizes.
    sizes = [data.draw(st.integers(1, 70), label=f"size{d}") for d in range(n)]
    xs = [arrays((s,), seed + d) for d, s in enumerate(sizes)]
    link = SWITCH if algorithm == "tree" else None
    (tile, fast), rep = run_both(n, all_gather, xs, link=link, algorithm=algorithm)
    ref = all_gather_reference(xs)
    for d in range(n):
        np.testing.assert_array_equal(tile[d], ref[d])
        np.testing.assert_array_equal(fast[d], ref[d])
    if algorithm == "ring":
        assert rep.link_bytes == (n - 1) * sum(sizes) * 2  # every shard crosses N - 1 links once


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_ring_all_reduce_cycles_follow_the_cost_formula(n):
    # Equal chunks of 64 bf16 elements, one SRAM tile each: 2 (N - 1) sends of B / N bytes at
    # the link rate plus their latencies, and N - 1 chunk reductions after their receives.
    size = 64 * n
    nbytes = 2 * size
    xs = [np.ones(size, np.float32)] * n
    _, rep = DeviceGroup(TINY, n).run(all_reduce, xs)
    want = ring_all_reduce_cycles(TINY_LINK, n, nbytes, chunk_add_cycles(TINY, nbytes // n))
    assert rep.cycles == want
    assert want == 2 * (n - 1) * (TINY_LINK.latency_cycles + nbytes / n / TINY_LINK.bytes_per_cycle) + (
        n - 1
    ) * (2 * (TINY.dma_dram_latency + 128 / TINY.dma_queue_bytes_per_cycle) + TINY.vector_latency + 4)
    # on one link 2 (N - 1) / N of the tensor
    assert all(v["bytes"] == 2 * (n - 1) * nbytes // n for v in rep.links.values())


def test_tree_all_gather_cycles_are_its_sends():
    # 64 bf16 elements (128 B) a device on the tiny switch: latency 100, 4 B/cycle a port.
    lat, bw = SWITCH.latency_cycles, SWITCH.bytes_per_cycle
    ones = np.ones(64, np.float32)

    def cycles(n):
        return DeviceGroup(TINY, n, link=SWITCH).run(all_gather, [ones] * n, algorithm="tree")[1].cycles

    # Two devices: 1 sends its block up, 0 sends the whole (256 B) back down.
    assert cycles(2) == (lat + 128 / bw) + (lat + 256 / bw)
    # Four: 1 -> 0 and 3 -> 2 (one block), then 2 -> 0 (two blocks); down, 0 sends the whole
    # (512 B) to 2 and to 1 at once, the two sharing its port, then 2 -> 3.
    up = (lat + 128 / bw) + (lat + 256 / bw)
    down = (lat + 2 * 512 / bw) + (lat + 512 / bw)
    assert cycles(4) == up + down


@pytest.mark.parametrize("n", [2, 4, 6])
def test_ring_all_gather_cycles_are_its_sends(n):
    _, rep = DeviceGroup(TINY, n).run(all_gather, [np.ones(64, np.float32)] * n)
    assert rep.cycles == (n - 1) * (TINY_LINK.latency_cycles + 128 / TINY_LINK.bytes_per_cycle)


def to_device0_emit(g, x, senders=(1, 2)):
    """Each sender sends its x to device 0 (into its part of device 0's output); every other
    device copies its x twice into its own output."""
    size = x[0].size
    outs = [g[0].output((len(senders) * size,), name="out")]
    outs += [g[d].output((2 * size,), name="out") for d in range(1, len(g))]
    for i, d in enumerate(senders):
        g[d].send(0, outs[0].region(i * size, (size,), (1,)), x[d].region(0, (size,), (1,)))
    for d in range(1, len(g)):
        for half in range(2):
            g[d].dma(outs[d][half * size : (half + 1) * size], x[d].region(0, (size,), (1,)))
    return outs


def to_device0_fast(x, senders=(1, 2)):
    return [np.concatenate([x[d] for d in senders])] + [np.concatenate([a, a]) for a in x[1:]]


TO_DEVICE0 = GroupKernel("to_device0", to_device0_emit, to_device0_fast)


def test_link_contention_two_senders_share_the_receivers_port():
    size = 400  # 800 bytes
    xs = [np.full(size, d, np.float32) for d in range(3)]
    lat, bw = SWITCH.latency_cycles, SWITCH.bytes_per_cycle
    (tile, fast), one = run_both(3, TO_DEVICE0, xs, link=SWITCH, senders=(1,))
    assert one.cycles == lat + 800 / bw
    (tile, fast), both = run_both(3, TO_DEVICE0, xs, link=SWITCH)
    np.testing.assert_array_equal(tile[0], np.r_[xs[1], xs[2]])
    # Both sends land on device 0's ingress port at once: each at half the port's bandwidth.
    assert both.cycles == lat + 2 * 800 / bw
    assert both.link_bound_cycles == 2 * 800 / bw
    assert both.links["link1->0"]["bytes"] == both.links["link2->0"]["bytes"] == 800


def test_ring_allows_neighbours_only_and_tree_needs_a_switch():
    xs = [np.ones(8, np.float32)] * 4
    with pytest.raises(KernelError, match="devices 2 and 0 are not neighbours on the tiny-ring ring of 4"):
        DeviceGroup(TINY, 4).run(TO_DEVICE0, xs)
    for kernel, what in (
        (all_reduce, "all-reduce"),
        (all_gather, "all-gather"),
        (reduce_scatter, "reduce-scatter"),
    ):
        with pytest.raises(NotImplementedError, match=f"tree {what} on a ring"):
            DeviceGroup(TINY, 4).run(kernel, xs, algorithm="tree")
    with pytest.raises(KernelError, match="one shape"):
        DeviceGroup(TINY, 2).run(all_reduce, [np.ones(8, np.float32), np.ones(9, np.float32)])
