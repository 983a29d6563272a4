import dataclasses
import json

import numpy as np

from npu_emulator import NPU, TINY, CycleReport, Kernel


def scale_kernel():
    def emit(k, x):
        out = k.output(x.shape)
        t = k.alloc(x.shape)
        k.dma(t, x, queue=0)
        k.activation("exp", t, t, scale=0.5)
        k.dma(out, t, queue=1)
        return out

    return Kernel("scale_exp", emit, lambda x: np.exp(0.5 * x))


def test_report_prints_a_readable_table():
    _, rep = NPU(TINY, mode="tile").run(scale_kernel(), np.zeros((8, 8), np.float32))
    text = str(rep)
    for part in (
        "CycleReport 'scale_exp' on tiny",
        "total",
        "roofline",
        "sfu (x1)",
        "dma.q0",
        "dram->local",
        "peak SRAM",
        "activation.exp 1",
    ):
        assert part in text, part
    d = rep.to_dict()
    assert d["cycles"] == rep.cycles and d["emulated_us"] == rep.cycles / TINY.clock_hz * 1e6
    assert 0 <= d["pct_of_roofline"] <= 100
    assert set(d["utilisation"]) == {"matrix", "vector", "sfu", "dma", "dram"}


def test_trace_has_one_track_per_unit_and_queue(tmp_path):
    x = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    out, rep = NPU(TINY, mode="tile").run(scale_kernel(), x, trace=tmp_path / "t.json")
    np.testing.assert_allclose(out, np.exp(0.5 * x), rtol=2**-7)
    doc = json.loads((tmp_path / "t.json").read_text())
    events = doc["traceEvents"]
    threads = [e for e in events if e["ph"] == "M" and e["name"] == "thread_name"]
    assert len(threads) == 3 * TINY.num_engines + TINY.dma_queues
    assert {e["args"]["name"] for e in threads} >= {"engine0.matrix", "engine0.sfu", "dma.q0", "dma.q3"}
    slices = [e for e in events if e["ph"] == "X"]
    assert len(slices) == len(rep.stream)
    us = 1e6 / TINY.clock_hz
    assert max(e["ts"] + e["dur"] for e in slices) <= rep.cycles * us + 1e-9
    sfu = next(e for e in slices if e["cat"] == "activation.exp")
    assert sfu["dur"] == (TINY.sfu_latency + 64 / TINY.sfu_lanes) * us


def test_sequence_adds_cycles_bytes_and_counts():
    npu = NPU(TINY)
    _, r1 = npu.run(scale_kernel(), np.zeros((8, 8), np.float32))
    _, r2 = npu.run(scale_kernel(), np.zeros((16, 8), np.float32))
    both = CycleReport.sequence("two", [r1, r2])
    assert both.cycles == r1.cycles + r2.cycles
    assert both.dram_bytes == r1.dram_bytes + r2.dram_bytes
    assert both.instructions == {"dma": 4, "activation.exp": 2}
    assert both.unit_busy["engine0.sfu"] == r1.unit_busy["engine0.sfu"] + r2.unit_busy["engine0.sfu"]


def test_sequence_trace_lays_kernels_end_to_end(tmp_path):
    from npu_emulator.trace import write_sequence_trace

    npu = NPU(TINY)
    _, r1 = npu.run(scale_kernel(), np.zeros((8, 8), np.float32))
    _, r2 = npu.run(scale_kernel(), np.zeros((16, 8), np.float32))
    doc = json.loads(open(write_sequence_trace(tmp_path / "s.json", [r1, r2, r1])).read())
    kernels = [e for e in doc["traceEvents"] if e.get("cat") == "kernel"]
    us = 1e6 / TINY.clock_hz
    assert [k["ts"] for k in kernels] == [0, r1.cycles * us, (r1.cycles + r2.cycles) * us]
    slices = [e for e in doc["traceEvents"] if e["ph"] == "X" and e.get("cat") != "kernel"]
    assert len(slices) == 2 * len(r1.stream) + len(r2.stream)
    assert max(e["ts"] + e["dur"] for e in slices) <= doc["otherData"]["cycles"] * us + 1e-9


def test_roofline_takes_every_units_bound_and_names_the_binding_one():
    cfg = TINY.replace(name="tiny2", num_engines=2)

    def emit(k, x, *, queues=(0, 1, 2, 3), exps=1):
        """Each engine loads half of x, applies exp ``exps`` times, stores it back."""
        out = k.output(x.shape)
        half = x.shape[0] // 2
        for e in range(2):
            t = k.alloc((half, x.shape[1]), engine=e)
            rows = slice(e * half, (e + 1) * half)
            k.dma(t, x[rows], queue=queues[2 * e])
            for _ in range(exps):
                k.activation("exp", t, t, scale=0.5)
            k.dma(out[rows], t, queue=queues[2 * e + 1])
        return out

    x = np.zeros((16, 64), np.float32)
    kernel = Kernel("probe", emit, None)
    npu = NPU(cfg)
    spread = npu.plan(kernel, [(x.shape, "bf16")], {}).report
    nbytes = x.size * 2
    sfu = 2 * 4 * (cfg.sfu_latency + 8 * 64 / cfg.sfu_lanes) / 2  # 4 exps per engine, / engines
    assert spread.unit_bounds == {
        "dram": 2 * nbytes / cfg.dram_bytes_per_cycle,
        "matrix": 0.0,
        "vector": 0.0,
        "sfu": spread.unit_bounds["sfu"],
        **{f"dma.q{q}": nbytes / 2 / cfg.dma_queue_bytes_per_cycle for q in range(4)},
    }
    many = npu.plan(kernel, [(x.shape, "bf16")], {"exps": 4}).report
    assert many.unit_bounds["sfu"] == sfu and many.binding_unit == "sfu"
    assert many.roofline_cycles == sfu and many.pct_of_roofline == 100 * sfu / many.cycles
    # Every engine on one queue: that queue's bytes bind, and the report says so.
    shared = npu.plan(kernel, [(x.shape, "bf16")], {"queues": (0, 0, 0, 0)}).report
    assert shared.binding_unit == "dma.q0"
    assert shared.roofline_cycles == 2 * nbytes / cfg.dma_queue_bytes_per_cycle <= shared.cycles
    assert "binding: dma.q0" in str(shared) and shared.to_dict()["binding_unit"] == "dma.q0"
    # Bounds of kernels run one after another add up; old saved reports keep matrix and DRAM.
    both = CycleReport.sequence("both", [many, shared])
    assert both.unit_bounds["sfu"] == sfu + shared.unit_bounds["sfu"]
    assert both.unit_bounds["dma.q0"] == many.unit_bounds["dma.q0"] + shared.unit_bounds["dma.q0"]
    old = dataclasses.replace(spread, bounds=None)  # saved before reports had per-unit bounds
    assert old.unit_bounds == {"dram": spread.unit_bounds["dram"], "matrix": 0.0}
