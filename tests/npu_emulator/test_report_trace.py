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
