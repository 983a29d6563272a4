"""Gemma RMSNorm (and its per-head use for q_norm / k_norm) and LayerNorm with bias (SigLIP).

RMSNorm, as Hugging Face's Gemma3RMSNorm computes it::

    y = float32(x) * rsqrt(mean(float32(x)^2) + eps) * (1 + float32(w)),  cast back to x's dtype

IO (DRAM): x (..., D) with D a multiple of W = len(w); the norm runs over each group of W
elements (W = D: the hidden-size norm; W = head_dim: q_norm / k_norm over every head);
w (W,); out like x. Compile-time constants: eps.
Tiling (``kernels.common.stream_rows``): rows split over engines, ``tr`` rows per tile with
``tr * W <= vector_max_elements``; per tile 1 DMA in, 5 vector/SFU instructions, 1 DMA out.
SRAM per engine: 2 x (in + out) tiles + fp32 scratch (tr, W) + (1, W) weights.
FLOPs: none on the matrix unit; about 4 vector ops per element. Bandwidth bound: DRAM bytes
= 2 x size(x) (+ the weights once per engine).

LayerNorm, as torch.nn.LayerNorm (SigLIP's layer_norm1/2, post_layernorm; eps 1e-6) computes
it on fp32 values::

    y = (x - mean(x)) / sqrt(var(x) + eps) * w + b,  var the biased (1/D) variance,
        fp32 math, cast back to x's dtype

IO (DRAM): x (..., D), w (D,), b (D,), out like x. Compile-time constants: eps.
Tiling: ``stream_rows`` as above; per tile 1 DMA in, 9 vector/SFU instructions (sum, scale,
subtract, square, sum, rsqrt, two multiplies, add; the mean is subtracted before squaring, the
two-pass variance), 1 DMA out.
SRAM per engine: 2 x (in + out) tiles + fp32 scratch 2 x (tr, D) + (1, D) weight and bias.
FLOPs: none on the matrix unit; 7 full-width vector ops per element. Bandwidth bound: DRAM
bytes = 2 x size(x) (+ w and b once per engine).
"""

from __future__ import annotations

import numba
import numpy as np

from npu_emulator import Kernel, KernelError

from .common import Operand, rows_view, stream_rows


def rmsnorm_reference(x: np.ndarray, w: np.ndarray, *, eps: float = 1e-6) -> np.ndarray:
    g = x.astype(np.float64).reshape(-1, w.shape[-1])
    y = g / np.sqrt(np.mean(g * g, axis=-1, keepdims=True) + eps) * (1.0 + w.astype(np.float64))
    return y.reshape(x.shape)


@numba.njit(parallel=True, cache=True)  # rows on Numba's threads (npu_kernels/hostmath.py)
def _rmsnorm_rows(x, w1, eps, out):
    rows, width = x.shape
    for r in numba.prange(rows):
        acc = np.float32(0.0)
        for c in range(width):
            acc += x[r, c] * x[r, c]
        inv = np.float32(1.0) / np.sqrt(acc / np.float32(width) + np.float32(eps))
        for c in range(width):
            out[r, c] = x[r, c] * inv * w1[c]


def rmsnorm_fast(x: np.ndarray, w: np.ndarray, *, eps: float = 1e-6) -> np.ndarray:
    width = w.shape[-1]
    g = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, width)
    out = np.empty_like(g)
    _rmsnorm_rows(g, (1.0 + w.astype(np.float32)).astype(np.float32), np.float32(eps), out)
    return out.reshape(x.shape)


def _check_groups(name, x, w):
    if len(w.shape) != 1 or x.shape[-1] % w.shape[0]:
        raise KernelError(f"{name}: weight {w.shape} must be 1-D and divide the last dim of x {x.shape}")


def rmsnorm_emit(k, x, w, *, eps: float = 1e-6):
    _check_groups("rmsnorm", x, w)
    width = w.shape[0]
    out = k.output(x.shape, x.dtype, name="out")

    def setup(k, e, once):
        (w_t,) = once
        w1 = k.alloc((1, width), "fp32", engine=e, name=f"w1_e{e}")
        k.vector("add", w1, w_t, 1.0)  # Gemma scales by (1 + w), in fp32
        return w1

    def body(k, e, ins, outs, scr, w1):
        x_t, (o,) = ins[0], outs
        sq, ms = scr["sq"], scr["ms"]
        k.vector("square", sq, x_t)  # fp32 from here on
        k.reduce("sum", ms, sq)
        k.activation("rsqrt", ms, ms, scale=1.0 / width, bias=eps)  # rsqrt(mean + eps)
        k.vector("mul", sq, x_t, ms)
        k.vector("mul", o, sq, w1)  # cast to the output dtype on the way out

    stream_rows(
        k,
        [Operand(rows_view(x, width)), Operand(w.region(0, (1, width), (width, 1)), per_row=False)],
        [rows_view(out, width)],
        body,
        scratch={"sq": (width, "fp32"), "ms": (1, "fp32")},
        setup=setup,
    )
    return out


rmsnorm = Kernel("rmsnorm", rmsnorm_emit, rmsnorm_fast, rmsnorm_reference)


# ------------------------------------------------------------------------------ LayerNorm


def layernorm_reference(x: np.ndarray, w: np.ndarray, b: np.ndarray, *, eps: float = 1e-6) -> np.ndarray:
    g = x.astype(np.float64)
    mean = g.mean(axis=-1, keepdims=True)
    var = ((g - mean) ** 2).mean(axis=-1, keepdims=True)
    return (g - mean) / np.sqrt(var + eps) * w.astype(np.float64) + b.astype(np.float64)


@numba.njit(cache=True)  # one thread: see npu_kernels/hostmath.py
def _layernorm_rows(x, w, b, eps, out):
    rows, width = x.shape
    n = np.float32(width)
    for r in range(rows):
        acc = np.float32(0.0)
        for c in range(width):
            acc += x[r, c]
        mean = acc / n
        acc = np.float32(0.0)
        for c in range(width):
            d = x[r, c] - mean
            acc += d * d
        inv = np.float32(1.0) / np.sqrt(acc / n + np.float32(eps))
        for c in range(width):
            out[r, c] = (x[r, c] - mean) * inv * w[c] + b[c]


def layernorm_fast(x: np.ndarray, w: np.ndarray, b: np.ndarray, *, eps: float = 1e-6) -> np.ndarray:
    width = x.shape[-1]
    g = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, width)
    out = np.empty_like(g)
    _layernorm_rows(
        g, np.ascontiguousarray(w, np.float32), np.ascontiguousarray(b, np.float32), np.float32(eps), out
    )
    return out.reshape(x.shape)


def layernorm_emit(k, x, w, b, *, eps: float = 1e-6):
    width = x.shape[-1]
    if w.shape != (width,) or b.shape != (width,):
        raise KernelError(
            f"layernorm: weight {w.shape} and bias {b.shape} must both be ({width},) for x {x.shape}"
        )
    out = k.output(x.shape, x.dtype, name="out")

    def body(k, e, ins, outs, scr, _):
        (x_t, w_t, b_t), (o,) = ins, outs
        xc, sq, s = scr["xc"], scr["sq"], scr["s"]
        k.reduce("sum", s, x_t)  # fp32 from here on
        k.vector("mul", s, s, 1.0 / width)  # mean
        k.vector("sub", xc, x_t, s)
        k.vector("square", sq, xc)
        k.reduce("sum", s, sq)
        k.activation("rsqrt", s, s, scale=1.0 / width, bias=eps)  # rsqrt(var + eps)
        k.vector("mul", xc, xc, s)
        k.vector("mul", xc, xc, w_t)
        k.vector("add", o, xc, b_t)  # cast to the output dtype on the way out

    row = (1, width), (width, 1)
    stream_rows(
        k,
        [
            Operand(rows_view(x)),
            Operand(w.region(0, *row), per_row=False),
            Operand(b.region(0, *row), per_row=False),
        ],
        [rows_view(out)],
        body,
        scratch={"xc": (width, "fp32"), "sq": (width, "fp32"), "s": (1, "fp32")},
    )
    return out


layernorm = Kernel("layernorm", layernorm_emit, layernorm_fast, layernorm_reference)
