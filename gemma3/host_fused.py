"""One jitted pass per decoder layer of a decode step: the per-kernel ``fast`` functions' numbers,
bit for bit, with no per-kernel Python and few thread-pool forks.

``decode_layer`` runs a whole Gemma 3 decoder layer for a batch of one token per sequence:
input RMSNorm, the fused q/k/v product, q/k norms, RoPE, the KV-cache write, decode attention
over the first L cache slots, the o product, the post-attention and pre-feedforward norms, the
GeGLU MLP and the post-feedforward norm with both residual adds. It is the composition that
``HostDecode`` (``gemma3/host_step.py``) used to make of the kernels' fast functions, written
so that every value is the same:

* **Every stored intermediate is rounded where the device stores it**: under bf16 numerics a
  kernel's inputs and outputs live in bf16 DRAM tensors, so each kernel output (and the
  residual stream each time a kernel reads it) is rounded to bfloat16 (``bf16``; fp32 numerics
  keep fp32), as ``HostDecode``'s ``stored`` does. The MLP's h is rounded as the kernel's
  tiled program keeps it (``geglu_mlp_fast``).
* **Every reduction keeps the per-kernel order**: the products are hostmath's own column
  routine (``npu_kernels/hostmath.py``: each output's fixed 16-lane order, whichever block
  computes it); the norms sum squares left to right as ``npu_kernels/norms.py``; the attention
  sums each score over head_dim left to right from +0, the softmax's denominator and each
  output element over the slots left to right, skipping slots of zero weight
  (``npu_kernels/attention_decode.py``). What runs in parallel are independent outputs
  (columns of a product, blocks of slots of the scores, query heads), never parts of one sum.
  The row maximum of the softmax is taken per block of slots and then over the blocks: a
  maximum does not depend on the order (NaN scores aside).
* **The same elementwise code**: the expressions of rope, GeGLU (``matmul.geglu_into``) and the
  softmax's ``exp`` are those of the kernels, compiled by Numba without fast-math (no fused
  multiply-add, no reassociation).

Per layer the work forks the thread pool six times (q/k/v columns, score blocks, query
heads' softmax and weighted values, o columns, gate/up columns with the GeGLU, down columns);
the small serial parts between them (norms, RoPE, the cache write: a few thousand values) run
on the calling thread. The tests hold the tokens, logits and cycle reports equal to the
per-kernel path's and the attention to ``attention_decode_fast``, bit for bit
(``tests/gemma3/test_host_step.py``); the rounding (``npu_emulator/bf16.py``) is held to
ml_dtypes' (``tests/npu_emulator/test_memory.py``).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from npu_emulator.bf16 import round_value as round_bf16
from npu_emulator.fixedmath import exp32
from npu_kernels.attention_decode import NEG
from npu_kernels.hostmath import _F32, _I32, _I64, LANES, TILE_N, _mm_columns, block_columns
from npu_kernels.matmul import geglu_into

SLOTS = 32  # cache slots per parallel block of scores


@numba.njit(cache=True, error_model="numpy")
def _norm(src, m, s0, width, w1, eps, bf16, round_in, dst, d0):
    """dst[m, d0 : d0 + width] = rmsnorm(src[m, s0 : s0 + width]) (rounded to the stored dtype),
    as ``npu_kernels.norms._rmsnorm_rows``; ``round_in``: the input is first stored (rounded)."""
    acc = np.float32(0.0)
    for c in range(width):
        v = src[m, s0 + c]
        if round_in:
            v = round_bf16(v, bf16)
        acc += v * v
    inv = np.float32(1.0) / np.sqrt(acc / np.float32(width) + eps)
    for c in range(width):
        v = src[m, s0 + c]
        if round_in:
            v = round_bf16(v, bf16)
        dst[m, d0 + c] = round_bf16(v * inv * w1[c], bf16)


@numba.njit(cache=True, error_model="numpy")
def _rope(x, m, x0, hd, cos, sin, bf16, out, o0):
    """out[m, o0 : o0 + hd] = rope(x[m, x0 : x0 + hd]) with the position's table rows (row m of
    cos and sin), as ``npu_kernels.rope._rope_rows``, rounded to the stored dtype."""
    h2 = hd // 2
    for i in range(h2):
        x1 = x[m, x0 + i]
        x2 = x[m, x0 + i + h2]
        out[m, o0 + i] = round_bf16(x1 * cos[m, i] + x2 * -sin[m, i], bf16)
        out[m, o0 + i + h2] = round_bf16(x2 * cos[m, i + h2] + x1 * sin[m, i + h2], bf16)


@numba.njit(cache=True, error_model="numpy")
def _heads(qkv, hq, hkv, hd, qn1, kn1, cos, sin, eps, bf16, q, k_cache, v_cache, where, tmp):
    """q/k norms and RoPE of every head (q into ``q`` (B, Hq * hd)), and the new k and v into the
    caches at each sequence's slot ``where[b]``: the kernels' steps, one sequence at a time."""
    for b in range(qkv.shape[0]):
        for h in range(hq):
            _norm(qkv, b, h * hd, hd, qn1, eps, bf16, False, tmp, 0)
            _rope(tmp, b, 0, hd, cos, sin, bf16, q, h * hd)
        for g in range(hkv):
            _norm(qkv, b, (hq + g) * hd, hd, kn1, eps, bf16, False, tmp, 0)
            _rope(tmp, b, 0, hd, cos, sin, bf16, tmp, hd)
            for d in range(hd):
                k_cache[b, g, where[b], d] = tmp[b, hd + d]
                v_cache[b, g, where[b], d] = qkv[b, (hq + hkv + g) * hd + d]


def _score_tile(group: int):
    """An intrinsic ``tile(q, k, acc, q0, j0, n)``: acc[h, l] = sum over d of q[q0 + h hd + d]
    * k[j0 + l, d], d left to right from +0, for the ``group`` query heads h and the slots
    j0 + l, l < n <= ``LANES`` (lanes past n hold no meaning). q (Hq hd,) and k (S, hd) fp32,
    C-contiguous; acc (group, LANES) fp32. One vector lane per slot: each lane's sum is the
    kernel's scalar one, and a slot's keys are loaded once for all the group's heads."""

    @intrinsic
    def tile(typingctx, q, k, acc, q0, j0, n):
        def codegen(context, builder, sig, args):
            q_ty, k_ty, a_ty = sig.args[:3]
            q_, k_, a_ = (context.make_array(t)(context, builder, v) for t, v in zip(sig.args[:3], args[:3]))
            q0_, j0_, n_ = args[3:6]
            hd = builder.extract_value(k_.shape, 1)
            vec = ir.VectorType(_F32, LANES)
            zero = ir.Constant(_I64, 0)
            rows = []
            for lane in range(LANES):  # lanes past n read slot j0 (any valid row)
                inside = builder.icmp_signed("<", ir.Constant(_I64, lane), n_)
                row = builder.select(inside, builder.add(j0_, ir.Constant(_I64, lane)), j0_)
                rows.append(cgutils.get_item_pointer(context, builder, k_ty, k_, [row, zero]))
            q_ptr = cgutils.get_item_pointer(context, builder, q_ty, q_, [q0_])
            accs = [cgutils.alloca_once_value(builder, ir.Constant(vec, None)) for _ in range(group)]
            splat = ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES)
            with cgutils.for_range(builder, hd) as loop:
                d = loop.index
                keys = ir.Constant(vec, ir.Undefined)
                for lane, row in enumerate(rows):
                    keys = builder.insert_element(
                        keys, builder.load(builder.gep(row, [d])), ir.Constant(_I32, lane)
                    )
                for h in range(group):
                    index = builder.add(builder.mul(ir.Constant(_I64, h), hd), d)
                    qd = builder.load(builder.gep(q_ptr, [index]))
                    qv = builder.insert_element(ir.Constant(vec, ir.Undefined), qd, ir.Constant(_I32, 0))
                    qv = builder.shuffle_vector(qv, ir.Constant(vec, ir.Undefined), splat)
                    builder.store(builder.fadd(builder.load(accs[h]), builder.fmul(qv, keys)), accs[h])
            for h in range(group):
                total = builder.load(accs[h])
                for lane in range(LANES):
                    ptr = cgutils.get_item_pointer(
                        context, builder, a_ty, a_, [ir.Constant(_I64, h), ir.Constant(_I64, lane)]
                    )
                    builder.store(builder.extract_element(total, ir.Constant(_I32, lane)), ptr)
            return context.get_dummy_value()

        return types.void(q, k, acc, types.intp, types.intp, types.intp), codegen

    return tile


_tile_1, _tile_2, _tile_4, _tile_8 = (_score_tile(g) for g in (1, 2, 4, 8))


@numba.njit(cache=True, error_model="numpy")
def _scores(t, q, k_cache, mask, scale, hq, hkv, hd, s, top):
    """Scores of block t = (b, g, block of ``SLOTS`` slots) for the group's query heads: each the
    sum over head_dim from +0, left to right (as the kernel's), times scale plus the mask; and
    the block's maxima."""
    length = mask.shape[1]
    blocks = top.shape[2]
    group = hq // hkv
    b, rest = t // (hkv * blocks), t % (hkv * blocks)
    g, jb = rest // blocks, rest % blocks
    acc = np.zeros((group, LANES), np.float32)
    keys = k_cache[b, g]
    m = np.full(group, np.float32(NEG))
    for j0 in range(jb * SLOTS, min(length, (jb + 1) * SLOTS), LANES):
        n = min(length - j0, LANES)
        if group == 4:
            _tile_4(q[b], keys, acc, g * group * hd, j0, n)
        elif group == 2:
            _tile_2(q[b], keys, acc, g * group * hd, j0, n)
        elif group == 1:
            _tile_1(q[b], keys, acc, g * group * hd, j0, n)
        elif group == 8:
            _tile_8(q[b], keys, acc, g * group * hd, j0, n)
        else:  # the kernel's loop itself
            for h in range(group):
                for j in range(n):
                    dot = np.float32(0.0)
                    for d in range(hd):
                        dot += q[b, (g * group + h) * hd + d] * keys[j0 + j, d]
                    acc[h, j] = dot
        for h in range(group):
            for j in range(n):
                v = acc[h, j] * scale + mask[b, j0 + j]
                s[b, g * group + h, j0 + j] = v
                m[h] = max(m[h], v)
    for h in range(group):
        top[b, g * group + h, jb] = m[h]


@numba.njit(cache=True, error_model="numpy")
def _attend(t, s, top, v_cache, hkv, hd, bf16, out):
    """Query head t = (b, h): the softmax of its scores (exp(score - row max), the weights' sum
    left to right) and its output, the sum over the slots, left to right, of weight times value
    (slots of zero weight skipped) over the weights' sum, rounded to the stored dtype."""
    hq, length, blocks = s.shape[1], s.shape[2], top.shape[2]
    b, h = t // hq, t % hq
    g = h // (hq // hkv)
    m = np.float32(NEG)
    for i in range(blocks):
        m = max(m, top[b, h, i])
    total = np.float32(0.0)
    acc = np.zeros(hd, np.float32)
    for j in range(length):
        p = exp32(s[b, h, j] - m)
        total += p
        if p != 0.0:
            for d in range(hd):
                acc[d] += p * v_cache[b, g, j, d]
    for d in range(hd):
        out[b, h * hd + d] = round_bf16(acc[d] / total, bf16)


@numba.njit(cache=True, error_model="numpy")
def _round_rows(x, bf16):
    if bf16:
        for m in range(x.shape[0]):
            for c in range(x.shape[1]):
                x[m, c] = round_bf16(x[m, c], bf16)


@numba.njit(cache=True, error_model="numpy")
def _add_norm(x, y, w1, eps, bf16, tmp):
    """x += rmsnorm(y) per row (the norm's output rounded; y, a kernel output, already is)."""
    for m in range(x.shape[0]):
        _norm(y, m, 0, y.shape[1], w1, eps, bf16, False, tmp, 0)
        for c in range(x.shape[1]):
            x[m, c] = x[m, c] + tmp[m, c]


@numba.njit(parallel=True, cache=True, error_model="numpy")
def decode_layer(
    x,
    norms,
    w_qkv,
    w_o,
    w_gate,
    w_up,
    w_down,
    cos,
    sin,
    k_cache,
    v_cache,
    where,
    mask,
    scale,
    eps,
    hq,
    hkv,
    hd,
    bf16,
    threads,
):
    """One decoder layer of a decode step on the residual stream x (B, D), in place (module
    docstring). norms (6, max(D, hd)) fp32: the (1 + w) of the input, q, k, post-attention,
    pre-feedforward and post-feedforward norms, in that order; w_* the products' weights as
    (N, K) rows (fp32 or bf16 bits); cos, sin (B, hd) the table rows at each sequence's
    position; k_cache, v_cache (B, Hkv, S, hd) fp32; where (B,) the slot of the new key and
    value; mask (B, L) the additive mask of the first L slots; threads: Numba's thread count
    (the products' column blocks follow it)."""
    rows, width = x.shape
    nqkv, f = w_qkv.shape[0], w_gate.shape[0]
    h = np.empty((rows, width), np.float32)
    for m in range(rows):
        _norm(x, m, 0, width, norms[0], eps, bf16, True, h, 0)

    qkv = np.empty((rows, nqkv), np.float32)
    blk = block_columns(nqkv, TILE_N, nqkv, threads)
    for t in numba.prange(-(-nqkv // blk)):
        _mm_columns(h, w_qkv, qkv, t * blk, min(nqkv, (t + 1) * blk))
    _round_rows(qkv, bf16)

    q = np.empty((rows, hq * hd), np.float32)
    tmp = np.empty((rows, 2 * hd), np.float32)
    _heads(qkv, hq, hkv, hd, norms[1], norms[2], cos, sin, eps, bf16, q, k_cache, v_cache, where, tmp)

    length = mask.shape[1]
    slot_blocks = -(-length // SLOTS)
    s = np.empty((rows, hq, length), np.float32)
    top = np.empty((rows, hq, slot_blocks), np.float32)
    for t in numba.prange(rows * hkv * slot_blocks):
        _scores(t, q, k_cache, mask, scale, hq, hkv, hd, s, top)
    a = np.empty((rows, hq * hd), np.float32)
    for t in numba.prange(rows * hq):
        _attend(t, s, top, v_cache, hkv, hd, bf16, a)

    o = np.empty((rows, width), np.float32)
    blk = block_columns(width, TILE_N, width, threads)
    for t in numba.prange(-(-width // blk)):
        _mm_columns(a, w_o, o, t * blk, min(width, (t + 1) * blk))
    _round_rows(o, bf16)
    _add_norm(x, o, norms[3], eps, bf16, h)

    for m in range(rows):
        _norm(x, m, 0, width, norms[4], eps, bf16, True, h, 0)
    gate = np.empty((rows, f), np.float32)
    up = np.empty((rows, f), np.float32)
    hidden = np.empty((rows, f), np.float32)
    blk = block_columns(f, TILE_N, f, threads)
    for t in numba.prange(-(-f // blk)):
        n0, n1 = t * blk, min(f, (t + 1) * blk)
        _mm_columns(h, w_gate, gate, n0, n1)
        _mm_columns(h, w_up, up, n0, n1)
        geglu_into(gate, up, hidden, n0, n1, bf16)
    blk = block_columns(width, TILE_N, width, threads)
    for t in numba.prange(-(-width // blk)):
        _mm_columns(hidden, w_down, o, t * blk, min(width, (t + 1) * blk))
    _round_rows(o, bf16)
    _add_norm(x, o, norms[5], eps, bf16, h)
