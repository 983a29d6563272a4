import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emulator import NPU, TINY, KernelError, round_bf16
from emulator.dma import RES_DRAM
from kernels.kvcache import cache_rows, kv_cache_write, kv_cache_write_reference, write_tiles
from tests.strategies import arrays, seeds

# A small chip with four engines and eight queues: tiles land on several engines' SRAM.
TINY4 = TINY.replace(name="tiny4", num_engines=4, dma_queues=8, shared_sram_bytes=1 << 20)
CHIPS = st.sampled_from([TINY, TINY4])


@st.composite
def writes(draw, *, max_len: int = 40):
    """(B, Hkv, S, hd, slots (B, T), ring): a global cache (slot = position, positions stay
    below S) or a ring buffer (slot = position % S, a chunk may wrap around), prefill chunks
    (T > 1) and decode (T = 1, each sequence at its own position)."""
    b = draw(st.integers(1, 3), label="B")
    hkv = draw(st.integers(1, 3), label="Hkv")
    s_len = draw(st.integers(1, max_len), label="S")
    hd = draw(st.one_of(st.sampled_from([1, 7, 8, 9, 17, 65]), st.integers(1, 80)), label="hd")
    t = draw(st.one_of(st.just(1), st.integers(1, s_len)), label="T")
    ring = draw(st.booleans(), label="ring")
    top = 4 * s_len if ring else s_len - t  # first position of the chunk, per sequence
    starts = np.array(draw(st.lists(st.integers(0, top), min_size=b, max_size=b), label="starts"))
    slots = starts[:, None] + np.arange(t)[None, :]
    return b, hkv, s_len, hd, slots % s_len if ring else slots, ring


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


def check_write(b, hkv, s_len, hd, slots, seed, cfg, numerics):
    t = slots.shape[1]
    cache = arrays((b, hkv, s_len, hd), seed)
    new = arrays((b, t, hkv, hd), seed + 1)
    rows = cache_rows(slots, hkv, s_len)
    if numerics == "bf16":  # values are rounded on the way in; DMA then copies bytes exactly
        cache, new = round_bf16(cache), round_bf16(new)
    expect = kv_cache_write_reference(cache, new, rows)
    (tile, fast), (rep_tile, rep_fast) = run_both(cfg, numerics, cache, new, rows)
    np.testing.assert_array_equal(tile, expect)
    np.testing.assert_array_equal(fast, expect)
    touched = np.zeros((b, hkv, s_len), bool)
    touched[np.arange(b)[:, None, None], np.arange(hkv)[None, None, :], slots[:, :, None]] = True
    np.testing.assert_array_equal(tile[~touched], cache[~touched])  # untouched slots keep values
    assert rep_tile == rep_fast
    n = b * t * hkv
    # Exactly the new rows and their int32 indices come in; exactly the new rows go out.
    assert rep_tile.bytes_by_path == {"dram->local": n * (hd * 2 + 4), "local->dram": n * hd * 2}
    assert rep_tile.flops == 0
    s = rep_tile.stream
    assert rep_tile.dram_bytes == s.nbytes[s.is_dma & ((s.res & RES_DRAM) != 0)].sum()
    assert rep_tile.cycles >= rep_tile.dram_bytes / cfg.dram_bytes_per_cycle


@settings(max_examples=80, deadline=None)
@given(w=writes(), seed=seeds, cfg=CHIPS, numerics=st.sampled_from(["fp32", "bf16"]))
def test_writes_the_new_rows_and_nothing_else(w, seed, cfg, numerics):
    b, hkv, s_len, hd, slots, _ = w
    check_write(b, hkv, s_len, hd, slots, seed, cfg, numerics)


@pytest.mark.parametrize("cfg", [TINY, TINY4], ids=["tiny", "tiny4"])
@pytest.mark.parametrize(
    "slots, s_len",
    [
        (np.array([[5], [0], [11]]), 12),  # decode: each sequence at its own position
        (np.arange(8)[None, :] + np.array([[0], [3]]), 16),  # global prefill chunks
        ((np.arange(6)[None, :] + np.array([[5], [9]])) % 8, 8),  # ring chunks that wrap
        (np.arange(96)[None, :] % 96, 96),  # a long chunk: several tiles, several scatters
    ],
)
def test_global_ring_prefill_and_decode(slots, s_len, cfg):
    check_write(slots.shape[0], 2, s_len, 24, slots, 3, cfg, "bf16")


def test_a_chunk_longer_than_the_ring_keeps_the_last_token():
    # 7 tokens into a ring of 4: slots 0..3 get tokens 4, 5, 6, 3 (the last written wins).
    b, hkv, s_len, hd, t = 1, 2, 4, 5, 7
    slots = np.arange(t)[None, :] % s_len
    cache = arrays((b, hkv, s_len, hd), 0)
    new = arrays((b, t, hkv, hd), 1)
    rows = cache_rows(slots, hkv, s_len)
    (tile, fast), _ = run_both(TINY4, "fp32", cache, new, rows)
    for got in (tile, fast):
        np.testing.assert_array_equal(got[0, :, 0], new[0, 4, :])
        np.testing.assert_array_equal(got[0, :, 3], new[0, 3, :])
        np.testing.assert_array_equal(got, kv_cache_write_reference(cache, new, rows))


def test_cache_rows_indexes_the_flattened_cache():
    rows = cache_rows(np.array([[3, 4], [0, 7]]), 3, 8)
    assert rows.dtype == np.int32 and rows.shape == (2, 2, 3)
    np.testing.assert_array_equal(rows[1, 1], [(3 + 0) * 8 + 7, (3 + 1) * 8 + 7, (3 + 2) * 8 + 7])
    np.testing.assert_array_equal(rows[0, 0], [3, 11, 19])
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        cache_rows(np.array([[8]]), 1, 8)


def test_write_tiles_cover_the_rows_in_order():
    for cfg in (TINY, TINY4, NPU("atom").config):
        for n in (1, 7, 256, 4096, 16384):
            got = write_tiles(cfg, n, 128, 2)
            assert [r0 for r0, _, _ in got] == list(np.cumsum([0] + [rl for _, rl, _ in got])[:-1])
            assert sum(rl for _, rl, _ in got) == n
            assert all((rl * (128 * 2 + 4)) <= cfg.local_sram_bytes // 2 for _, rl, _ in got)


def test_mismatched_shapes_are_refused():
    cache = np.zeros((1, 2, 8, 4), np.float32)
    with pytest.raises(KernelError, match="shapes do not agree"):
        NPU(TINY).run(
            kv_cache_write, cache, np.zeros((1, 3, 1, 4), np.float32), np.zeros((1, 3, 1), np.int32)
        )
