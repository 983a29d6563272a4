"""Shared hypothesis strategies: keyword-only, small defaults, non-tile-multiple shapes on purpose.

Sizes are biased towards values that are no multiple of any tile (1, primes, tile +- 1): about
half the draws come from a list of such sizes, the rest are uniform. Each kernel's cases are
drawn on the test chips ``chips``: TINY and TINY4."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from hypothesis import strategies as st

from npu_emulator import TINY

# ----------------------------------------------------------------------------- chips, seeds

# A small chip with four engines and eight DMA queues: at test sizes, work splits over engines
# (an engine grid, token / head / column / KV-length blocks), operands several engines read are
# staged through shared SRAM, and partial results are combined on device.
TINY4 = TINY.replace(name="tiny4", num_engines=4, dma_queues=8, shared_sram_bytes=1 << 20)
chips = st.sampled_from([TINY, TINY4])

seeds = st.integers(0, 2**16)


def arrays(shape, seed: int, scale: float = 1.0) -> np.ndarray:
    """Reproducible float32 normal values for a drawn shape."""
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# ----------------------------------------------------------------------------------- sizes

# Against TINY's matmul tiles: an 8 x 8 MAC array, operands up to 64 x 64 x 64 (127 and 129
# straddle two).
MATMUL_SIZES = (1, 2, 3, 7, 8, 9, 17, 63, 64, 65, 127, 129)
# Against TINY's vector tiles: 16 vector lanes, 8 SFU lanes, row tiles of a quarter of an
# engine's rows.
VECTOR_SIZES = (1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65, 127, 129)
# Against the same matmul tiles (8 +- 1 ... 64 +- 1) for the vision kernels' widths up to 100.
VISION_SIZES = (1, 2, 3, 7, 8, 9, 15, 17, 31, 33, 63, 65)
VMAX = TINY.vector_max_elements  # TINY's per-instruction limit: wider rows are chunked


def sizes(*, max_value: int, awkward: Sequence[int] = MATMUL_SIZES) -> st.SearchStrategy[int]:
    """An int in [1, max_value]: half the draws from the ``awkward`` sizes that fit, half uniform."""
    return st.one_of(st.sampled_from(awkward).filter(lambda d: d <= max_value), st.integers(1, max_value))


# -------------------------------------------------------------------------- matmul, lm_head


@st.composite
def matmul_shapes(draw, *, max_m: int = 80, max_k: int = 150, max_n: int = 90):
    """(M, K, N), biased towards sizes that are not multiples of any tile (1, primes, tile +- 1)."""
    return (
        draw(sizes(max_value=max_m), label="M"),
        draw(sizes(max_value=max_k), label="K"),
        draw(sizes(max_value=max_n), label="N"),
    )


@st.composite
def lm_head_cases(draw, *, max_d: int = 150, max_v: int = 700):
    """(B, D, V): B in {1, 2, 3}; D and V not multiples of any tile (1, primes, tile +- 1).
    ``max_d`` and ``max_v`` bound the uniform draws only: every awkward size up to 129 stays."""
    awkward = st.sampled_from(MATMUL_SIZES)
    b = draw(st.sampled_from([1, 2, 3]), label="B")
    d = draw(st.one_of(awkward, st.integers(1, max_d)), label="D")
    v = draw(st.one_of(awkward, st.integers(1, max_v)), label="V")
    return b, d, v


# ------------------------------------------------------------------------------- attention


@st.composite
def prefill_cases(draw, *, max_t: int = 12, max_hd: int = 72):
    """(T, Hq, Hkv, hd, B, S, consts) for attention_prefill, consts without the scale: T and hd
    off every tile size (and 1), GQA ratios 1, 2 and 8, global and ring caches, windows smaller
    and larger than the sequence (and than image blocks), rings of the window's slots or more
    (a model rounds a ring up to whole KV tiles), image blocks that straddle the chunk's start
    or lie inside it. Not every case is a valid call (the kernel's ring and cache rules):
    filter them with the kernel's geometry."""
    T = draw(st.one_of(st.sampled_from([1, 2, 7, 8, 9]), st.integers(1, max_t)), label="T")
    G = draw(st.sampled_from([1, 2, 8]), label="G")
    Hkv = draw(st.integers(1, 1 if G == 8 else 2), label="Hkv")
    hd = draw(st.one_of(st.sampled_from([1, 7, 8, 9, 63, 64, 65]), st.integers(1, max_hd)), label="hd")
    q_start = draw(st.one_of(st.just(0), st.integers(0, 30)), label="q_start")
    ring = draw(st.booleans(), label="ring")
    if ring:
        window = draw(st.one_of(st.sampled_from([1, 2, 3]), st.integers(1, 24)), label="window")
        S = window + draw(st.sampled_from([0, 0, 1, 5, 7]), label="S - window")  # padded ring
    else:
        window = draw(st.one_of(st.none(), st.integers(1, 24)), label="window")
        S = draw(st.integers(max(1, q_start), q_start + 8), label="S")
    blocks = []
    for _ in range(draw(st.integers(0, 2), label="n_blocks")):
        s = draw(st.integers(max(0, q_start - 6), q_start + T - 1), label="block start")
        e = draw(st.integers(s + 1, q_start + T), label="block end")
        if all(e <= s0 or s >= e0 for s0, e0 in blocks):
            blocks.append((s, e))
    B = draw(st.integers(1, 2), label="B")
    batch = draw(st.integers(0, B - 1), label="batch")
    consts = dict(q_start=q_start, window=window, ring=ring, batch=batch, image_blocks=tuple(blocks))
    return T, G * Hkv, Hkv, hd, B, S, consts


@st.composite
def decode_shapes(draw, *, max_tiles: int = 6):
    """(B, Hkv, G, hd, L tiles, S - L) for attention_decode: GQA ratios 1, 2, 8; head dims off
    every tile size (TINY's MAC block is 8, its matmul limit 64); S is any length >= L."""
    b = draw(st.integers(1, 3), label="B")
    hkv = draw(st.sampled_from([1, 1, 2, 3]), label="Hkv")
    group = draw(st.sampled_from([1, 2, 8]), label="G")
    hd = draw(st.one_of(st.sampled_from([1, 7, 8, 9, 17, 33, 64, 65, 72]), st.integers(1, 80)), label="hd")
    n_tiles = draw(st.integers(1, max_tiles), label="L tiles")
    extra = draw(st.integers(0, 13), label="S - L")
    return b, hkv, group, hd, n_tiles, extra


@st.composite
def flash_decode_shapes(draw, *, max_part_tiles: int = 4, max_parts: int = 3):
    """(B, Hkv, G, hd, tiles per partition, live partitions, S - L) for attention_decode_flash:
    decode_shapes' heads with L = live partitions x partition slots."""
    b, hkv, group, hd, _, extra = draw(decode_shapes(max_tiles=1))
    part_tiles = draw(st.integers(1, max_part_tiles), label="tiles per partition")
    parts = draw(st.integers(1, max_parts), label="live partitions")
    return b, hkv, group, hd, part_tiles, parts, extra


@st.composite
def kv_cache_writes(draw, *, max_len: int = 40):
    """(B, Hkv, S, hd, slots (B', T), batch offset): a global cache (slot = position, positions
    stay below S) or a ring buffer (slot = position % S; a chunk may wrap around, and may be
    longer than the ring), prefill chunks (T > 1) and decode (T = 1, each sequence at its own
    position), for all B sequences of the cache or B' of them from an offset."""
    b = draw(st.integers(1, 3), label="B")
    hkv = draw(st.integers(1, 3), label="Hkv")
    s_len = draw(st.integers(1, max_len), label="S")
    hd = draw(st.one_of(st.sampled_from([1, 7, 8, 9, 17, 65]), st.integers(1, 80)), label="hd")
    ring = draw(st.booleans(), label="ring")
    t = draw(st.one_of(st.just(1), st.integers(1, 3 * s_len if ring else s_len)), label="T")
    top = 4 * s_len if ring else s_len - t  # first position of the chunk, per sequence
    b_new = draw(st.integers(1, b), label="B'")
    offset = draw(st.integers(0, b - b_new), label="batch offset")
    starts = np.array(draw(st.lists(st.integers(0, top), min_size=b_new, max_size=b_new), label="starts"))
    slots = starts[:, None] + np.arange(t)[None, :]
    return b, hkv, s_len, hd, slots % s_len if ring else slots, offset


@st.composite
def rope_cases(draw, *, max_tokens: int = 40, max_heads: int = 6):
    """(T, H, hd, P): single tokens, token counts that are not multiples of any tile, head
    dims up to Gemma3's 256, tables longer or shorter than T. ``max_tokens`` bounds the
    uniform draw of T only: the awkward counts up to 33 stay."""
    tokens = draw(st.one_of(st.sampled_from([1, 2, 3, 7, 9, 17, 33]), st.integers(1, max_tokens)), label="T")
    heads = draw(st.integers(1, max_heads), label="H")
    hd = draw(st.sampled_from([2, 4, 8, 16, 32, 64, 128, 256]), label="hd")
    positions = draw(st.integers(1, 300), label="P")
    return tokens, heads, hd, positions


# ------------------------------------------------------------------- row-wise vector kernels


@st.composite
def softmax_shapes(draw, *, max_elements: int = 24_000):
    """(rows, cols): single rows, non-multiples of every tile, and rows wider than one vector
    instruction; rows * cols bounded so tile mode stays quick."""
    cols = draw(
        st.one_of(
            st.sampled_from([1, 2, 3, 7, 63, 65, VMAX - 1, VMAX, VMAX + 1, 2 * VMAX + 3]),
            st.integers(1, 9000),
        ),
        label="cols",
    )
    limit = max(1, min(40, max_elements // cols))
    rows = draw(sizes(max_value=limit, awkward=(1, 2, 3, 7, 9, 17)), label="rows")
    return rows, cols


@st.composite
def row_shapes(
    draw,
    *,
    max_rows: int = 40,
    max_width: int = 300,
    max_tokens: int = 9,
    max_heads: int = 5,
    max_head_dim: int = 40,
):
    """(rows, width), or (T, H, hd) for per-head use (q_norm, k_norm) with width = hd."""
    if draw(st.booleans(), label="per_head"):
        return (
            draw(sizes(max_value=max_tokens, awkward=VECTOR_SIZES), label="T"),
            draw(sizes(max_value=max_heads, awkward=VECTOR_SIZES), label="H"),
            draw(sizes(max_value=max_head_dim, awkward=VECTOR_SIZES), label="hd"),
        )
    return (
        draw(sizes(max_value=max_rows, awkward=VECTOR_SIZES), label="rows"),
        draw(sizes(max_value=max_width, awkward=VECTOR_SIZES), label="width"),
    )


@st.composite
def embedding_cases(draw, *, max_tokens: int = 40, max_vocab: int = 300, max_width: int = 600):
    """(T, V, D): single tokens, sizes that are not multiples of any tile, and (rarely) rows
    wider than one vector instruction (D = VMAX + 1, past ``max_width``). ``max_tokens`` bounds
    the uniform draw of T only: the awkward counts up to 33 stay."""
    tokens = draw(st.one_of(st.sampled_from([1, 2, 3, 7, 9, 17, 33]), st.integers(1, max_tokens)), label="T")
    vocab = draw(st.integers(1, max_vocab), label="V")
    width = draw(
        st.one_of(st.sampled_from([1, 2, 3, 8, 63, 65, VMAX + 1]), st.integers(1, max_width)), label="D"
    )
    return tokens, vocab, width


# ---------------------------------------------------------------------------------- vision


@st.composite
def patch_shapes(draw, *, max_patch: int = 5, max_grid: int = 9, max_d: int = 80):
    """(C, H, W, patch, D) for patch_embed: grids of 1..max_grid patches a side (N up to 81 >
    the 64-row matmul limit), sometimes with a remainder past the last whole patch, K = C p^2
    up to 75 > 64."""
    c = draw(st.sampled_from([1, 2, 3]), label="C")
    p = draw(st.integers(1, max_patch), label="patch")
    gh, gw = draw(st.integers(1, max_grid), label="gh"), draw(st.integers(1, max_grid), label="gw")
    rh, rw = draw(st.integers(0, p - 1), label="rem_h"), draw(st.integers(0, p - 1), label="rem_w")
    return c, gh * p + rh, gw * p + rw, p, draw(sizes(max_value=max_d, awkward=VISION_SIZES), label="D")


@st.composite
def projector_shapes(
    draw, *, max_pool: int = 4, max_side: int = 9, max_pooled_side: int = 5, max_dim: int = 100
):
    """(g, pool, Dv, Dt) for mm_projector: pool 1 (up to max_side^2 = 81 tokens, more than one
    matmul's 64 rows) to max_pool, with up to max_pooled_side tokens a side when pooling."""
    pool = draw(st.integers(1, max_pool), label="pool")
    gp = draw(st.integers(1, max_side if pool == 1 else max_pooled_side), label="tokens_per_side")
    dv = draw(sizes(max_value=max_dim, awkward=VISION_SIZES), label="Dv")
    return gp * pool, pool, dv, draw(sizes(max_value=max_dim, awkward=VISION_SIZES), label="Dt")


# ----------------------------------------------------------------------------- collectives

# Flat sizes against TINY's vector tiles (16 lanes) and its collectives' SRAM tile (4096
# elements): fewer elements than devices, chunks off the lanes, past one tile.
COLLECTIVE_SIZES = (1, 2, 3, 7, 15, 17, 63, 65, 4095, 4097)


@st.composite
def collective_cases(draw, *, max_devices: int = 4, max_elements: int = 9000):
    """(devices, shape): a device count and one device's tensor shape (1-D or 2-D)."""
    n = draw(st.integers(1, max_devices), label="devices")
    size = draw(sizes(max_value=max_elements, awkward=COLLECTIVE_SIZES), label="elements")
    if draw(st.booleans(), label="2-D") and size > 1:
        rows = draw(st.sampled_from([r for r in (2, 3, 5, 7) if size % r == 0] or [1]), label="rows")
        return n, (rows, size // rows)
    return n, (size,)


@st.composite
def lora_cases(draw, *, max_groups: int = 3, max_rows: int = 70, max_d: int = 150, max_rank: int = 64):
    """(G, rows per group, Din, Dout, R, N) for the lora kernel: decode (one row per group, several
    groups) and prefill (one group of many rows, past TINY's 64-row matmul limit); widths off
    every tile; ranks 1 to 64 (R is a matmul N and K: TINY's limit); 2 to 4 adapters."""
    g = draw(st.integers(1, max_groups), label="G")
    rows = draw(st.sampled_from([1, 1, 2, 7, 64, max_rows]), label="rows per group")
    din = draw(sizes(max_value=max_d), label="Din")
    dout = draw(sizes(max_value=max_d), label="Dout")
    r = draw(st.sampled_from([1, 4, 8, 16, max_rank]), label="R")
    return g, rows, din, dout, r, draw(st.integers(2, 4), label="N")
