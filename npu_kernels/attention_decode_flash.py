"""Flash attention for decode: the KV cache in partitions, each reduced on its own, then combined.

What Optimum RBLN compiles for ``attn_impl="flash_attn"`` (its ``FlashAttentionOp``, the custom
op ``paged_flash_causal_attn_decode`` with ``partition=kvcache_partition_len``): a global
layer's cache of max_seq_len positions is split into partitions of P positions (one paged
block each, ``kvcache_block_size == kvcache_partition_len``), the host tells the op how far
each partition is filled (``clamp(pos - p * P, 0, P)``), and a partition nothing was written
to is skipped. Per sequence b, query head h (kv head g = h // (Hq // Hkv)) and partition p of
slots [p P, (p + 1) P)::

    s_p   = scale * q[b, h] @ k_cache[b, g, pP:(p+1)P].T + mask[b, pP:(p+1)P]
    m_p   = max(max_j s_p[j], NEG)          l_p = sum_j exp(s_p[j] - m_p)
    o_p   = sum_j exp(s_p[j] - m_p) v_cache[b, g, pP + j]
    M     = max_p m_p,  w_p = exp(m_p - M)
    out[b, h] = sum_p w_p o_p / sum_p w_p l_p          (the flash-decoding reduction)

which equals softmax attention over the live partitions' slots (``attention_decode``).

IO (DRAM) as ``attention_decode``: q (B, Hq, hd); k_cache, v_cache (B, Hkv, S, hd); mask (B, L)
additive (0 visible, -inf or -1e30 not), L = live partitions x P <= S: the host passes only the
partitions up to the one holding the furthest position of the batch (``flash_decode_length``)
and masks the unfilled slots of the last one; out (B, Hq, hd). Compile-time constants: scale,
partition (P slots: a positive multiple of ``decode_kv_tile(cfg)``, dividing L).

The cost is that of L slots: it grows with the filled length in whole partitions, never with
the whole cache S (a step at position 5 of a P = 4096 cache reads 4096 slots of each global
layer; one at position 4096 reads 8192). Each partition is read in full even when only its
first slots are filled: a static program per partition, as the device's compiler makes it.

Plan: ``attention_decode``'s (npu_kernels/attention_decode.py: engines split the L / tile KV
tiles of every (b, g) evenly, pieces within SRAM, partials combined on the engine of a
(b, g)'s last piece) with one more cut: no piece crosses a partition boundary. Every piece
therefore lies in one partition, its (m, l, o) is part of that partition's partial, and the
combine of all pieces of (b, g) is the reduction above over partitions (a partition spread
over several engines is combined in the same step as its neighbours: exp(m_piece - M) for
every piece). SRAM, FLOPs (4 B Hq L hd) and DRAM bytes (K and V of the L slots once, q, the
mask and out) are attention_decode's at the same L; a combine holds one partial per piece,
at least one per live partition.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from npu_emulator import Kernel, KernelError
from npu_emulator.fixedmath import exp32

from .attention_decode import NEG, attention_decode_emit, decode_kv_tile

# ----------------------------------------------------------------------------- references


def attention_decode_flash_reference(q, k_cache, v_cache, mask, *, scale, partition):
    """Plain float64 NumPy: per-partition (m, l, o), then the flash-decoding reduction."""
    b, hq, hd = q.shape
    hkv, big_l = k_cache.shape[1], mask.shape[1]
    n = big_l // partition
    qg = q.astype(np.float64).reshape(b, hkv, hq // hkv, hd)  # (B, Hkv, G, hd)
    keys = k_cache[:, :, :big_l].astype(np.float64).reshape(b, hkv, n, partition, hd)
    vals = v_cache[:, :, :big_l].astype(np.float64).reshape(b, hkv, n, partition, hd)
    s = scale * np.einsum("bgqd,bgnpd->bgqnp", qg, keys)  # (B, Hkv, G, n, P)
    s = s + mask.astype(np.float64).reshape(b, 1, 1, n, partition)
    m = np.maximum(s.max(axis=-1), NEG)  # (B, Hkv, G, n): a fully masked partition gives l = 0
    p = np.exp(s - m[..., None])
    ll, o = p.sum(axis=-1), np.einsum("bgqnp,bgnpd->bgqnd", p, vals)
    w = np.exp(m - m.max(axis=-1, keepdims=True))  # (B, Hkv, G, n)
    out = (w[..., None] * o).sum(axis=-2) / (w * ll).sum(axis=-1)[..., None]
    return out.reshape(b, hq, hd)


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _flash_heads(q, k_cache, v_cache, mask, scale, partition, out):
    """Each (b, query head) in parallel, partition by partition (fp32): a partition's (m, l, o),
    folded into the running (M, sum w l, sum w o) as it is done."""
    b_n, hq, hd = q.shape
    hkv, big_l = k_cache.shape[1], mask.shape[1]
    g_n = hq // hkv
    for bh in numba.prange(b_n * hq):
        b, h = bh // hq, bh % hq
        g = h // g_n
        s = np.empty(partition, np.float32)
        o = np.empty(hd, np.float32)
        acc = np.zeros(hd, np.float32)
        big_m, total = np.float32(NEG), np.float32(0.0)
        for j0 in range(0, big_l, partition):
            m = np.float32(NEG)
            for j in range(partition):
                dot = np.float32(0.0)
                for d in range(hd):
                    dot += q[b, h, d] * k_cache[b, g, j0 + j, d]
                s[j] = dot * scale + mask[b, j0 + j]
                m = max(m, s[j])
            part = np.float32(0.0)
            o[:] = 0.0
            for j in range(partition):
                p = exp32(s[j] - m)
                part += p
                if p != 0.0:
                    for d in range(hd):
                        o[d] += p * v_cache[b, g, j0 + j, d]
            new_m = max(big_m, m)
            a, c = exp32(big_m - new_m), exp32(m - new_m)
            total = total * a + part * c
            for d in range(hd):
                acc[d] = acc[d] * a + o[d] * c
            big_m = new_m
        for d in range(hd):
            out[b, h, d] = acc[d] / total


def attention_decode_flash_fast(q, k_cache, v_cache, mask, *, scale, partition):
    """The whole op in float32, one Numba thread per (sequence, query head)."""
    out = np.empty(q.shape, np.float32)
    _flash_heads(
        np.ascontiguousarray(q, dtype=np.float32),
        np.asarray(k_cache, dtype=np.float32),
        np.asarray(v_cache, dtype=np.float32),
        np.ascontiguousarray(mask, dtype=np.float32),
        np.float32(scale),
        int(partition),
        out,
    )
    return out


# ----------------------------------------------------------------------------- the program


def flash_decode_length(reach: int, partition: int, slots: int) -> int:
    """Slots a step reads when the furthest sequence of the batch holds positions [0, reach):
    the live partitions, whole (at most the cache's ``slots``)."""
    return min(slots, math.ceil(reach / partition) * partition)


def check_partition(cfg, partition, length: int | None = None) -> None:
    """Refuse a partition the kernel cannot run: not a positive multiple of the KV tile, or
    (with ``length``) not dividing L."""
    tile = decode_kv_tile(cfg)
    if isinstance(partition, bool) or not isinstance(partition, int) or partition < 1 or partition % tile:
        raise KernelError(
            f"attention_decode_flash: partition {partition!r} must be a positive multiple of the KV "
            f"tile {tile} slots (decode_kv_tile of {cfg.name})"
        )
    if length is not None and length % partition:
        raise KernelError(
            f"attention_decode_flash: L = {length} slots is not a whole number of partitions of "
            f"{partition}; pass the live partitions whole (flash_decode_length)"
        )


def attention_decode_flash_emit(k, q, k_cache, v_cache, mask, *, scale, partition):
    check_partition(k.config, partition, mask.shape[1] if len(mask.shape) == 2 else None)
    return attention_decode_emit(k, q, k_cache, v_cache, mask, scale=scale, partition=partition)


attention_decode_flash = Kernel(
    "attention_decode_flash",
    attention_decode_flash_emit,
    attention_decode_flash_fast,
    attention_decode_flash_reference,
)

__all__ = [
    "attention_decode_flash",
    "attention_decode_flash_emit",
    "attention_decode_flash_fast",
    "attention_decode_flash_reference",
    "check_partition",
    "flash_decode_length",
]
