"""Exact cycles of small programs, computed from the config's fields by hand."""

import math

import numpy as np
import pytest

from npu_emulator import NPU, TINY, Kernel

CFG = TINY


def run(emit, *inputs, mode="tile", cfg=CFG, fast=None):
    kernel = Kernel("probe", emit, fast or (lambda *a, **k: None))
    return NPU(cfg, mode=mode).run(kernel, *inputs)


def dram_dma(nbytes, rate=CFG.dma_queue_bytes_per_cycle):
    return CFG.dma_dram_latency + nbytes / rate


def test_chain_dma_vector_dma_adds_up():
    def emit(k, x):
        out = k.output(x.shape)
        t = k.alloc(x.shape)
        k.dma(t, x, queue=0)
        k.vector("mul", t, t, 2.0)
        k.dma(out, t, queue=1)
        return out

    x = np.arange(40, dtype=np.float32).reshape(5, 8)
    out, rep = run(emit, x)
    np.testing.assert_array_equal(out, 2 * x)
    nbytes = x.size * 2  # bf16 on the device
    vec = CFG.vector_latency + math.ceil(x.size / CFG.vector_lanes)
    assert rep.cycles == math.ceil(2 * dram_dma(nbytes) + vec)
    assert rep.unit_busy["engine0.vector"] == vec
    assert rep.bytes_by_path == {"dram->local": nbytes, "local->dram": nbytes}
    assert rep.instructions == {"dma": 2, "vector.mul": 1}


def test_independent_transfers_on_two_queues_overlap():
    def emit(k, x):
        out = k.output(x.shape)
        t0, t1 = k.alloc(x.shape), k.alloc(x.shape)
        k.dma(t0, x, queue=0)
        k.dma(t1, x, queue=1)
        k.vector("add", t0, t0, t1)
        k.dma(out, t0, queue=2)
        return out

    x = np.ones((16, 16), np.float32)
    _, rep = run(emit, x)
    nbytes = x.size * 2
    vec = CFG.vector_latency + math.ceil(x.size / CFG.vector_lanes)
    # Two queues at 8 B/cycle each stay within DRAM's 16 B/cycle: both loads run at full rate.
    assert 2 * CFG.dma_queue_bytes_per_cycle <= CFG.dram_bytes_per_cycle
    assert rep.cycles == math.ceil(dram_dma(nbytes) + vec + dram_dma(nbytes))


@pytest.mark.parametrize("queues", [1, 2, 3, 4])
def test_concurrent_transfers_share_dram_bandwidth(queues):
    def emit(k, x):  # loads only: no output
        for q in range(queues):
            t = k.alloc(x.shape, name=f"t{q}")
            k.dma(t, x, queue=q)
        return ()

    x = np.ones((32, 32), np.float32)
    nbytes = x.size * 2
    rate = min(CFG.dma_queue_bytes_per_cycle, CFG.dram_bytes_per_cycle / queues)
    rep = NPU(CFG, mode="fast").plan(Kernel("share", emit, None), [(x.shape, "bf16")], {}).report
    assert rep.cycles == math.ceil(CFG.dma_dram_latency + nbytes / rate)
    # Never more than the DRAM bandwidth, whatever the number of queues.
    assert rep.dram_bytes / (rep.cycles - CFG.dma_dram_latency) <= CFG.dram_bytes_per_cycle


def test_one_queue_moves_in_order_and_overlaps_latencies():
    def emit(k, x):
        a, b = k.alloc(x.shape), k.alloc(x.shape)  # loads only: no output
        k.dma(a, x, queue=0)
        k.dma(b, x, queue=0)
        return ()

    x = np.ones((16, 16), np.float32)
    rep = NPU(CFG).plan(Kernel("q", emit, None), [(x.shape, "bf16")], {}).report
    nbytes = x.size * 2
    assert CFG.dma_outstanding >= 2
    # The second descriptor's latency runs while the first moves its bytes.
    assert rep.cycles == math.ceil(CFG.dma_dram_latency + 2 * nbytes / CFG.dma_queue_bytes_per_cycle)


def test_matmul_cost_and_back_to_back_fill_is_hidden():
    m, kk, n = 5, 20, 12

    def emit(k, a, b):
        out = k.output((m, n), "fp32")
        at, bt = k.alloc((m, kk)), k.alloc((kk, n))
        acc0, acc1 = k.alloc((m, n), "fp32"), k.alloc((m, n), "fp32")
        k.dma(at, a, queue=0)
        k.dma(bt, b, queue=1)
        k.matmul(acc0, at, bt)
        k.matmul(acc1, at, bt)  # ready at once: issued back to back
        k.vector("add", acc0, acc0, acc1)
        k.dma(out, acc0, queue=2)
        return out

    a = np.random.default_rng(0).standard_normal((m, kk)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((kk, n)).astype(np.float32)
    out, rep = run(emit, a, b)
    from npu_emulator import round_bf16

    np.testing.assert_allclose(out, 2 * (round_bf16(a) @ round_bf16(b)), rtol=1e-5, atol=1e-5)
    passes = math.ceil(kk / CFG.mac_rows) * math.ceil(n / CFG.mac_cols)
    one = CFG.mac_fill_drain + passes * max(m, CFG.mac_rows)
    assert rep.unit_busy["engine0.matrix"] == 2 * one - CFG.mac_fill_drain
    assert rep.flops == 2 * 2 * m * kk * n


def test_write_after_read_waits_and_explicit_after_orders():
    def emit(k, x):
        out = k.output(x.shape)
        t, u = k.alloc(x.shape), k.alloc(x.shape)
        k.dma(t, x, queue=0)
        k.vector("copy", u, t)
        reload = k.dma(t, x, queue=1)  # overwrites t: waits for the copy that reads it
        k.dma(out, u, queue=2, after=[reload])  # reads only u; ordered after the reload by hand
        return out

    x = np.ones((8, 8), np.float32)
    out, rep = run(emit, x)
    s, sched = rep.stream, rep.schedule
    deps = [list(s.dep_idx[s.dep_ptr[i] : s.dep_ptr[i + 1]]) for i in range(len(s))]
    assert deps == [[], [0], [0, 1], [1, 2]]  # RAW; WAW + WAR; RAW + explicit
    assert sched.start[2] >= sched.end[1]
    assert sched.start[3] >= sched.end[2]


def test_freed_sram_reused_only_after_its_last_reader():
    def emit(k, x):
        out = k.output(x.shape)
        t = k.alloc(x.shape, name="old")
        u = k.alloc(x.shape, name="u")
        k.dma(t, x, queue=0)
        k.vector("copy", u, t)
        k.free(t)
        fresh = k.alloc(x.shape, name="fresh")  # same addresses as "old"
        k.dma(fresh, x, queue=1)
        k.vector("add", u, u, fresh)
        k.dma(out, u, queue=2)
        return out

    x = np.ones((8, 8), np.float32)
    out, rep = run(emit, x)
    np.testing.assert_array_equal(out, 2 * x)
    assert rep.schedule.start[2] >= rep.schedule.end[1]


def test_host_transfers_use_the_host_link():
    def emit(k, x):
        out = k.output(x.shape)
        h = k.host(x.shape, name="host_src")
        k.dma(out, h, queue=0)
        return out

    x = np.ones((16, 16), np.float32)
    rep = NPU(CFG).plan(Kernel("h", emit, None), [(x.shape, "bf16")], {}).report
    nbytes = x.size * 2
    rate = min(CFG.dma_queue_bytes_per_cycle, CFG.host_bytes_per_cycle)
    assert rep.cycles == math.ceil(CFG.dma_host_latency + nbytes / rate)
    assert rep.bytes_by_path == {"host->dram": nbytes}


# ----------------------------------------------------------------------------- sustained rates


def test_dram_efficiency_scales_the_shared_dram_rate():
    # Four queues of 8 B/cycle would take 32 B/cycle; DRAM sustains 16 * 0.75 = 12 of it.
    cfg = CFG.replace(dram_efficiency=0.75)

    def emit(k, x):
        out = k.output(x.shape)
        ts = [k.alloc(x.shape) for _ in range(4)]
        for q, t in enumerate(ts):
            k.dma(t, x, queue=q)
        k.vector("copy", ts[0], ts[1])
        k.dma(out, ts[0], queue=0)
        return out

    x = np.ones((32, 32), np.float32)
    _, rep = run(emit, x, cfg=cfg)
    nbytes = x.size * 2
    load = cfg.dma_dram_latency + 4 * nbytes / (cfg.dram_bytes_per_cycle * cfg.dram_efficiency)
    vec = cfg.vector_latency + math.ceil(x.size / cfg.vector_lanes)
    store = cfg.dma_dram_latency + nbytes / cfg.dma_queue_bytes_per_cycle  # alone: the queue's rate
    assert rep.cycles == math.ceil(load + vec + store)
    assert rep.dram_bytes_per_cycle == cfg.dram_bytes_per_cycle  # the roofline stays at the peak


def test_matmul_efficiency_stretches_the_passes_not_the_fill():
    cfg = CFG.replace(matmul_efficiency=0.6)
    m, kk, n = 5, 20, 12

    def emit(k, a, b):
        out = k.output((m, n), "fp32")
        at, bt = k.alloc((m, kk)), k.alloc((kk, n))
        acc0, acc1 = k.alloc((m, n), "fp32"), k.alloc((m, n), "fp32")
        k.dma(at, a, queue=0)
        k.dma(bt, b, queue=1)
        k.matmul(acc0, at, bt)
        k.matmul(acc1, at, bt)  # back to back: the second one's fill is hidden
        k.vector("add", acc0, acc0, acc1)
        k.dma(out, acc0, queue=2)
        return out

    rep = NPU(cfg).plan(Kernel("mm", emit, None), [((m, kk), "bf16"), ((kk, n), "bf16")], {}).report
    passes = math.ceil(kk / cfg.mac_rows) * math.ceil(n / cfg.mac_cols)
    one = cfg.mac_fill_drain + math.ceil(passes * max(m, cfg.mac_rows) / 0.6)
    assert rep.unit_busy["engine0.matrix"] == 2 * one - cfg.mac_fill_drain
    assert rep.flops == 2 * 2 * m * kk * n  # the work is the same; only its rate changed


def test_kernel_launch_cycles_add_to_every_kernel():
    def emit(k, x):
        out = k.output(x.shape)
        k.dma(out, x, queue=0)
        return out

    sig = [((8, 8), "bf16")]
    base = NPU(CFG).plan(Kernel("copy", emit, None), sig, {}).report.cycles
    rep = NPU(CFG.replace(kernel_launch_cycles=300)).plan(Kernel("copy", emit, None), sig, {}).report
    assert rep.cycles == base + 300
