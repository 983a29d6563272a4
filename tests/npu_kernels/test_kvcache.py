import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npu_emulator import NPU, TINY, KernelError, round_bf16
from npu_emulator.dma import RES_DRAM
from npu_kernels.kvcache import cache_rows, kv_cache_write, kv_cache_write_reference, write_plan
from tests.strategies import TINY4, arrays, chips, kv_cache_writes, seeds

# On TINY4 tiles land on several engines' SRAM.
ATOM = NPU("atom").config

# Gemma 3 KV heads and head dims: 270M, 4B, 27B.
GEMMA3 = {"270m": (1, 256), "4b": (4, 256), "27b": (16, 128)}


def run_both(cfg, numerics, cache, new, rows):
    """Write with both modes; return the updated caches and the reports."""
    caches, reports = [], []
    for mode in ("tile", "fast"):
        npu = NPU(cfg, mode=mode, numerics=numerics)
        dev = npu.to_device(cache, name="cache")
        out, rep = npu.run(kv_cache_write, dev, new, rows)
        assert out == ()  # no outputs: the cache is updated in place
        caches.append(dev.numpy())
        reports.append(rep)
    return caches, reports


def scatters(rep):
    s = rep.stream
    return [i for i, op in enumerate(s.ops) if op == "scatter"]


def deps(stream, i):
    return stream.dep_idx[stream.dep_ptr[i] : stream.dep_ptr[i + 1]]


def check_schedule(rep, cfg, b_new, t, hkv, s_len, hd):
    """Scatters wait for no other scatter of their lap (unordered) and for every scatter of
    their sequence's previous lap, on the timeline too (the last write of a slot wins)."""
    plan = write_plan(cfg, b_new, t, hkv, s_len, hd, 2)
    ids = scatters(rep)
    assert len(ids) == len(plan.tiles)
    s, sched = rep.stream, rep.schedule
    by_lap: dict = {}
    for i, tile in zip(ids, plan.tiles):
        by_lap.setdefault((tile.seq, tile.lap), []).append(i)
        assert s.unit[i] == s.first_dma_unit + tile.lane
    for (seq, lap), mine in by_lap.items():
        before = by_lap.get((seq, lap - 1), [])
        for i in mine:
            on_scatters = {int(d) for d in deps(s, i) if s.ops[d] == "scatter"}
            # Only the previous lap's (the latest per queue: those on one queue run in order).
            assert on_scatters <= set(before)
            if before:
                assert sched.data_start[i] >= max(sched.end[j] for j in before)


def check_write(b, hkv, s_len, hd, slots, seed, cfg, numerics, offset=0):
    b_new, t = slots.shape
    cache = arrays((b, hkv, s_len, hd), seed)
    new = arrays((b_new, t, hkv, hd), seed + 1)
    rows = cache_rows(slots, hkv, s_len, batch_offset=offset)
    if numerics == "bf16":  # values are rounded on the way in; DMA then copies bytes exactly
        cache, new = round_bf16(cache), round_bf16(new)
    expect = kv_cache_write_reference(cache, new, rows)
    (tile, fast), (rep_tile, rep_fast) = run_both(cfg, numerics, cache, new, rows)
    np.testing.assert_array_equal(tile, expect)
    np.testing.assert_array_equal(fast, expect)
    touched = np.zeros((b, hkv, s_len), bool)
    seq = offset + np.arange(b_new)[:, None, None]
    touched[seq, np.arange(hkv)[None, None, :], slots[:, :, None]] = True
    np.testing.assert_array_equal(tile[~touched], cache[~touched])  # untouched slots keep values
    assert rep_tile == rep_fast
    n = b_new * t * hkv
    # Exactly the new rows and their int32 indices come in; exactly the new rows go out.
    assert rep_tile.bytes_by_path == {"dram->local": n * (hd * 2 + 4), "local->dram": n * hd * 2}
    assert rep_tile.io_bytes == n * (2 * hd * 2 + 4) == rep_tile.dram_bytes  # the roofline's bytes
    assert rep_tile.flops == 0
    s = rep_tile.stream
    assert rep_tile.dram_bytes == s.nbytes[s.is_dma & ((s.res & RES_DRAM) != 0)].sum()
    assert rep_tile.cycles >= rep_tile.dram_bytes / cfg.dram_bytes_per_cycle
    check_schedule(rep_tile, cfg, b_new, t, hkv, s_len, hd)
    return tile, rep_tile


@settings(max_examples=80, deadline=None)
@given(w=kv_cache_writes(), seed=seeds, cfg=chips, numerics=st.sampled_from(["fp32", "bf16"]))
def test_writes_the_new_rows_and_nothing_else(w, seed, cfg, numerics):
    b, hkv, s_len, hd, slots, offset = w
    check_write(b, hkv, s_len, hd, slots, seed, cfg, numerics, offset)


@pytest.mark.parametrize("cfg", [TINY, TINY4], ids=["tiny", "tiny4"])
@pytest.mark.parametrize(
    "slots, s_len",
    [
        (np.array([[5], [0], [11]]), 12),  # decode: each sequence at its own position
        (np.arange(8)[None, :] + np.array([[0], [3]]), 16),  # global prefill chunks
        ((np.arange(6)[None, :] + np.array([[5], [9]])) % 8, 8),  # ring chunks that wrap
        (np.arange(96)[None, :] % 96, 96),  # a long chunk: several tiles per lane
        ((np.arange(21)[None, :] + np.array([[2], [7]])) % 8, 8),  # 21 tokens, ring of 8: 3 laps
    ],
)
def test_global_ring_prefill_and_decode(slots, s_len, cfg):
    check_write(slots.shape[0], 2, s_len, 24, slots, 3, cfg, "bf16")


def test_one_sequence_into_a_batched_cache():
    # Prefill of sequence 2 of a 4-sequence cache: rows from batch_offset, the rest untouched.
    slots = np.arange(10)[None, :] + 3
    check_write(4, 2, 16, 8, slots, 5, TINY4, "fp32", offset=2)
    rows = cache_rows(slots, 2, 16, batch_offset=2)
    np.testing.assert_array_equal(rows[0, 0], [(2 * 2 + 0) * 16 + 3, (2 * 2 + 1) * 16 + 3])


@pytest.mark.parametrize("cfg", [TINY4, ATOM], ids=["tiny4", "atom"])
def test_a_chunk_longer_than_the_ring_keeps_the_last_token(cfg):
    # 7 tokens into a ring of 4: slots 0..3 get tokens 4, 5, 6, 3 (the last written wins).
    b, hkv, s_len, hd, t = 1, 2, 4, 5, 7
    slots = np.arange(t)[None, :] % s_len
    cache = arrays((b, hkv, s_len, hd), 0)
    new = arrays((b, t, hkv, hd), 1)
    rows = cache_rows(slots, hkv, s_len)
    (tile, fast), (rep, _) = run_both(cfg, "fp32", cache, new, rows)
    for got in (tile, fast):
        np.testing.assert_array_equal(got[0, :, 0], new[0, 4, :])
        np.testing.assert_array_equal(got[0, :, 3], new[0, 3, :])
        np.testing.assert_array_equal(got, kv_cache_write_reference(cache, new, rows))
    check_schedule(rep, cfg, b, t, hkv, s_len, hd)


def test_a_long_prefill_chunk_into_a_sliding_window_ring_on_atom():
    # Gemma 3 270M: a 1100-token chunk into a 512-slot ring, two sequences: three laps each,
    # every lap's writes after the previous lap's; slot j holds the last token with slot j.
    hkv, hd = GEMMA3["270m"]
    slots = (np.arange(1100)[None, :] + np.array([[0], [300]])) % 512
    tile, rep = check_write(2, hkv, 512, hd, slots, 9, ATOM, "bf16")
    assert len({t.lap for t in write_plan(ATOM, 2, 1100, hkv, 512, hd, 2).tiles}) == 3
    assert rep.pct_of_roofline > 80


def single_queue_cycles(cfg, n, hd, esz=2):
    """The write-out alone at one queue's rate: what ordered scatters could not beat."""
    return n * hd * esz / cfg.dma_queue_bytes_per_cycle


@pytest.mark.parametrize("model", sorted(GEMMA3))
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("tokens", [1, 256])
def test_atom_writes_near_the_dram_bound(model, batch, tokens):
    hkv, hd = GEMMA3[model]
    sig = [
        ((batch, hkv, 4096, hd), "bf16"),
        ((batch, tokens, hkv, hd), "bf16"),
        ((batch, tokens, hkv), "int32"),
    ]
    rep = NPU("atom").plan(kv_cache_write, sig, {}).report
    n = batch * tokens * hkv
    assert rep.io_bytes == n * (2 * hd * 2 + 4) == rep.dram_bytes
    assert rep.unit_bounds["dram"] == rep.io_bytes / ATOM.dram_bytes_per_cycle
    lat = ATOM.dma_dram_latency
    if tokens == 1:  # decode: an index load, then a scatter; two latencies and a little
        assert rep.cycles <= 2 * lat + 100
    else:  # one latency before the first byte, then DRAM bandwidth, not one queue's
        assert rep.cycles < single_queue_cycles(ATOM, n, hd)
        assert rep.cycles <= rep.roofline_cycles + lat + 32
        ids = scatters(rep)
        sched = rep.schedule
        busy = max(sum(sched.start[j] <= sched.start[i] < sched.end[j] for j in ids) for i in ids)
        assert busy >= ATOM.dram_bytes_per_cycle / ATOM.dma_queue_bytes_per_cycle
    check_schedule(rep, ATOM, batch, tokens, hkv, 4096, hd)


def test_unordered_scatters_beat_one_queue_on_a_multi_queue_chip():
    # DRAM moves 4 queues' worth per cycle: ordered scatters, one at a time on one queue, would
    # take at least the single-queue time for the write-out alone. T = 256, tile mode.
    wide = TINY4.replace(name="tiny4-wide", dram_bytes_per_cycle=32.0)
    hkv, hd, t = 1, 32, 256
    _, rep = check_write(1, hkv, t, hd, np.arange(t)[None, :], 4, wide, "bf16")
    assert rep.cycles < 0.6 * single_queue_cycles(wide, t * hkv, hd)
    assert rep.pct_of_roofline > 80
    assert len({int(rep.stream.unit[i]) for i in scatters(rep)}) == wide.dma_queues


def test_cache_rows_indexes_the_flattened_cache():
    rows = cache_rows(np.array([[3, 4], [0, 7]]), 3, 8)
    assert rows.dtype == np.int32 and rows.shape == (2, 2, 3)
    np.testing.assert_array_equal(rows[1, 1], [(3 + 0) * 8 + 7, (3 + 1) * 8 + 7, (3 + 2) * 8 + 7])
    np.testing.assert_array_equal(rows[0, 0], [3, 11, 19])
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        cache_rows(np.array([[8]]), 1, 8)


@pytest.mark.parametrize("cfg", [TINY, TINY4, ATOM], ids=["tiny", "tiny4", "atom"])
def test_write_plan_covers_the_rows_in_order_within_laps(cfg):
    for batch, tokens, hkv, s_len in (
        (1, 1, 1, 64),
        (4, 1, 16, 4096),
        (2, 7, 3, 4),
        (1, 4096, 16, 4096),
        (3, 700, 1, 512),
    ):
        hd = 128
        plan = write_plan(cfg, batch, tokens, hkv, s_len, hd, 2)
        starts = [t.start for t in plan.tiles]
        assert starts == list(np.cumsum([0] + [t.rows for t in plan.tiles])[:-1])
        assert sum(t.rows for t in plan.tiles) == batch * tokens * hkv
        for t in plan.tiles:
            first, last = divmod(t.start // hkv, tokens), divmod((t.start + t.rows - 1) // hkv, tokens)
            assert first[0] == last[0] == t.seq  # one sequence
            assert first[1] // s_len == last[1] // s_len == t.lap  # one lap of S tokens
        assert [t.lane for t in plan.tiles] == [i % plan.lanes for i in range(len(plan.tiles))]
        assert 1 <= plan.lanes <= cfg.dma_queues
        lanes_per_engine = math.ceil(plan.lanes / cfg.num_engines)
        ring = plan.depth * plan.slot_rows * (hd * 2 + 4) + 2 * cfg.sram_alignment
        assert lanes_per_engine * ring <= cfg.local_sram_bytes // 2


def test_mismatched_shapes_are_refused():
    cache = np.zeros((1, 2, 8, 4), np.float32)
    with pytest.raises(KernelError, match="shapes do not agree"):
        NPU(TINY).run(
            kv_cache_write, cache, np.zeros((1, 3, 1, 4), np.float32), np.zeros((1, 3, 1), np.int32)
        )
    with pytest.raises(KernelError, match="shapes do not agree"):  # more sequences than the cache
        NPU(TINY).run(
            kv_cache_write, cache, np.zeros((2, 3, 2, 4), np.float32), np.zeros((2, 3, 2), np.int32)
        )
