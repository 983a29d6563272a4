import json

import numpy as np
import pytest

from npu_emulator import (
    ATOM,
    TINY,
    AllocationError,
    DeviceGroup,
    GroupKernel,
    KernelError,
    LinkConfig,
    get_link,
)
from npu_emulator.config import PCIE5_X16, PCIE5_X16_SUSTAINED, TINY_LINK
from npu_kernels.collectives import all_reduce


def test_presets_join_devices_over_pcie_gen5_x16():
    # 32 GT/s x 16 lanes x 128/130 / 8 bits = 63.0 GB/s each way: 63 B/cycle at 1 GHz.
    assert PCIE5_X16.bytes_per_cycle == pytest.approx(32e9 * 16 * 128 / 130 / 8 / ATOM.clock_hz, rel=0.001)
    assert get_link(None, ATOM) is PCIE5_X16
    assert get_link(None, TINY) is TINY_LINK
    for name in ("rbln-ca02", "rbln-ca12", "rbln-ca22", "rbln-ca25"):
        assert DeviceGroup(name, 2).link is PCIE5_X16_SUSTAINED
    assert get_link("tiny-ring", ATOM) is TINY_LINK
    with pytest.raises(ValueError, match="unknown link preset 'nvlink'"):
        get_link("nvlink", ATOM)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"topology": "mesh"}, "topology must be one of"),
        ({"bytes_per_cycle": 0}, "bytes_per_cycle must be a positive number"),
        ({"latency_cycles": -1}, "latency_cycles must be a positive number"),
    ],
)
def test_bad_link_configs_raise(changes, match):
    with pytest.raises(ValueError, match=match):
        LinkConfig(**changes)


def test_bad_group_raises():
    with pytest.raises(ValueError, match="num_devices must be a positive integer, got 0"):
        DeviceGroup(TINY, 0)
    with pytest.raises(ValueError, match="input 'x' has 1 shards for 2 devices"):
        DeviceGroup(TINY, 2).run(all_reduce, [np.ones(4, np.float32)])


def test_a_shard_that_does_not_fit_names_the_device_and_leaves_nothing():
    group = DeviceGroup(TINY, 2)
    fits = np.zeros((1024,), np.float32)
    too_big = np.zeros((TINY.dram_bytes // 2 + 1024,), np.float32)  # bf16: past 64 MiB
    with pytest.raises(
        AllocationError, match=r"'w' .* in DRAM of device 1: asked \d+ B, .* of 67108864 B capacity"
    ):
        group.shard([fits, too_big], name="w")
    assert [npu.dram.used for npu in group.devices] == [0, 0]  # device 0's shard was freed
    shards = group.shard([fits, fits], name="w")
    assert [t.npu for t in shards] == group.devices
    with pytest.raises(AllocationError, match="'kv' does not fit device 1 of 2 .* asked 67,108,864 B"):
        group.check_fits("kv", [0, TINY.dram_bytes])


def test_report_and_trace_show_every_device_and_link(tmp_path):
    group = DeviceGroup(TINY, 3, mode="tile")
    xs = [np.full((40,), d, np.float32) for d in range(3)]
    out, rep = group.run(all_reduce, xs, trace=tmp_path / "t.json")
    np.testing.assert_array_equal(out[2], np.full(40, 3.0))
    assert [r.name for r in rep.devices] == ["all_reduce@0", "all_reduce@1", "all_reduce@2"]
    assert sorted(rep.links) == ["link0->1", "link1->2", "link2->0"]
    # each of the 2 (N - 1) steps moves every chunk once: the whole tensor, 40 bf16 elements
    assert rep.to_dict()["link_bytes"] == rep.link_bytes == 2 * (3 - 1) * 40 * 2
    assert "link0->1" in str(rep)
    doc = json.loads((tmp_path / "t.json").read_text())
    names = {e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "process_name"}
    assert {"device 0 engine 0", "device 2 DMA queues", "links"} <= names
    links_pid = next(
        e["pid"] for e in doc["traceEvents"] if e["name"] == "process_name" and e["args"]["name"] == "links"
    )
    sends = [e for e in doc["traceEvents"] if e.get("cat") == "send"]
    assert len(sends) == 3 * 2 * 2 and all(e["pid"] == links_pid for e in sends)
    assert max(e["ts"] + e["dur"] for e in doc["traceEvents"] if e["ph"] == "X") == pytest.approx(rep.time_us)


def bad_send_emit(g, x, where="sram"):
    outs = [g[d].output(x[d].shape, name="out") for d in range(len(g))]
    for d in range(len(g)):
        g[d].dma(outs[d], x[d])
    if where == "sram":
        t = g[0].alloc(x[0].shape, name="tile")
        g[0].dma(t, x[0])
        g[0].send(1, outs[1], t)
    elif where == "self":
        g[0].send(0, outs[0], x[0])
    else:
        g[0].send(1, outs[1], x[1])
    return outs


BAD_SEND = GroupKernel("bad_send", bad_send_emit, lambda x, where="sram": [a.copy() for a in x])


@pytest.mark.parametrize(
    "where, match",
    [
        ("sram", "the source 'tile' is in local SRAM of engine 0; links move DRAM to DRAM"),
        ("self", "destination device 0 is not another device of the group"),
        ("other", "the source 'x' lives on device 1, not device 0"),
    ],
)
def test_bad_sends_raise(where, match):
    with pytest.raises(KernelError, match=match):
        DeviceGroup(TINY, 2).run(BAD_SEND, [np.ones((4, 4), np.float32)] * 2, where=where)


def overlap_emit(g, x, y):
    """Device 0 sends x to device 1 while both scale their own y (independent of the send)."""
    outs = [g[d].output(x[d].shape, name="out") for d in range(2)]
    scaled = [g[d].output(y[d].shape, name="scaled") for d in range(2)]
    g[0].dma(outs[0], x[0])
    g[0].send(1, outs[1], x[0])
    for d in range(2):
        t = g[d].alloc(y[d].shape)
        g[d].dma(t, y[d], queue=1)
        g[d].vector("mul", t, t, 2.0)
        g[d].dma(scaled[d], t, queue=2)
    return outs, scaled


OVERLAP = GroupKernel("overlap", overlap_emit, lambda x, y: ([x[0], x[0]], [2 * b for b in y]))


def test_compute_overlaps_a_send_on_one_timeline():
    x = [np.ones((8, 50), np.float32)] * 2
    y = [np.ones((4, 16), np.float32)] * 2
    outs = {}
    for mode in ("tile", "fast"):
        outs[mode] = DeviceGroup(TINY, 2, mode=mode).run(OVERLAP, x, y)
    (o, s), rep = outs["tile"]
    assert rep == outs["fast"][1]
    np.testing.assert_array_equal(s[1], 2 * y[1])
    send = TINY_LINK.latency_cycles + 8 * 50 * 2 / TINY_LINK.bytes_per_cycle
    assert rep.cycles == send  # the scaling on both devices hides under the send
