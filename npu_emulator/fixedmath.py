"""fp32 ``exp``, ``tanh`` and GELU (tanh form) as fixed sequences of IEEE fp32 operations.

A libm ``expf`` or ``tanhf`` is a call: the emulator's jitted loops could not vectorise around
it (a 256 x 2048 GeGLU epilogue took about 9 ms on one core, half of a prefill MLP; a prefill
chunk's softmax, 6 ns a score), and its last bit is the C library's, not ours. Here they are
written out in ``+ - * /``, ``floor``, ``abs``, ``copysign``, comparisons and integer bit
operations on fp32 values, each rounded to fp32 by IEEE 754 (no fused multiply-add: Numba
contracts nothing without fast-math flags, NumPy calls one ufunc per operation). Those are
correctly rounded everywhere, so the results are the same on every x86-64 host, and LLVM
vectorises them.

``exp32`` / ``tanh32`` / ``gelu_tanh32`` (scalars, inlined into jitted loops) and
``exp32_array`` / ``tanh32_array`` / ``gelu_tanh32_array`` (NumPy: the emulator's
special-function unit in tile mode) run the same operations in the same order: the tests hold
them equal bit for bit.

exp(x), x clamped to [-104, 89] (exp rounds to 0 below, to inf above): x = n ln2 + r with
n = floor(x / ln2 + 1/2), r = (x - n LN2_HI) - n LN2_LO (Cody and Waite: LN2_HI has 9
significant bits, so n LN2_HI is exact), exp(r) by its Taylor polynomial of degree 7 in
Horner's order (|r| <= ln2 / 2: truncation below 1e-8 relative), times 2^(n // 2) and then
2^(n - n // 2), each built from its exponent bits (two normal factors, so a subnormal result
is rounded once). NaN gives NaN.

tanh(x) = sign(x) * t(|x|), a = |x|:

* a < ``SMALL`` (0.625): t = a + (a * a^2) * P(a^2), P a degree-5 polynomial fitted to
  (tanh(a) - a) / a^3 (relative error of the fit below 2e-10), in Horner's order.
* otherwise: t = 1 - 2 / (exp32(2 min(a, 10)) + 1). tanh(10) rounds to 1 in fp32.
* NaN gives NaN, +-inf gives +-1, -0 gives -0.

Accuracy (tested over every 1,021st fp32 value of the range that matters, and the edges): at
most 1 unit in the last place from the correctly rounded exp and tanh.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

from .bf16 import from_bits

F32 = np.float32
LOW, HIGH = F32(-104.0), F32(89.0)  # exp rounds to 0 below LOW, overflows above HIGH
SMALL = F32(0.625)  # below: the odd polynomial; above: through exp
CLAMP = F32(10.0)  # tanh rounds to +-1 beyond
# (tanh(a) - a) / a^3 ~= P(a^2), P(s) = P0 + P1 s + ... + P5 s^5 (least squares on Chebyshev
# nodes of [0, SMALL^2], weighted by a^3 / tanh(a): the error it makes in tanh, relative)
P0, P1, P2, P3, P4, P5 = (
    F32(-0.33333331),
    F32(0.13333201),
    F32(-0.05394625),
    F32(0.02169821),
    F32(-0.00817179),
    F32(0.00213823),
)
INV_LN2 = F32(1.4426950408889634)
LN2_HI = F32(0.693359375)  # 9 significant bits: n * LN2_HI is exact for |n| < 2^15
LN2_LO = F32(0.6931471805599453 - 0.693359375)
E1, E2, E3, E4, E5, E6, E7 = (F32(1.0 / f) for f in (1, 2, 6, 24, 120, 720, 5040))
HALF, ONE, TWO = F32(0.5), F32(1.0), F32(2.0)
GELU_C = F32(0.7978845608028654)  # sqrt(2 / pi)
GELU_CUBIC = F32(0.044715)


@intrinsic
def _divide(typingctx, x, y):
    """x / y in fp32, IEEE: Numba's ``/`` checks for a zero divisor (raising, as Python does),
    a branch that keeps the loops calling ``tanh32`` from vectorising; e + 1 >= 2 here."""

    def codegen(context, builder, sig, args):
        return builder.fdiv(args[0], args[1])

    return types.float32(types.float32, types.float32), codegen


@numba.njit(cache=True, inline="always")
def _power_of_two(n):
    """2^n as a float32, for -126 <= n <= 127."""
    return from_bits(np.uint32((n + np.int32(127)) << np.int32(23)))


@numba.njit(cache=True, inline="always")
def exp32(v):
    """exp of a float32 (module docstring), as a float32."""
    x = LOW if v < LOW else (HIGH if v > HIGH else v)  # (NaN: HIGH; replaced below)
    n = np.floor(x * INV_LN2 + HALF)
    r = (x - n * LN2_HI) - n * LN2_LO
    q = ((((((E7 * r + E6) * r + E5) * r + E4) * r + E3) * r + E2) * r + E1) * r + ONE
    i = np.int32(n)
    half = i >> np.int32(1)
    e = (q * _power_of_two(half)) * _power_of_two(i - half)
    return v if v != v else e


@numba.njit(cache=True, inline="always")
def tanh32(v):
    """tanh of a float32 (module docstring), as a float32."""
    a = np.abs(v)
    s = a * a
    p = ((((P5 * s + P4) * s + P3) * s + P2) * s + P1) * s + P0
    small = a + (a * s) * p
    big = ONE - _divide(TWO, exp32((a if a < CLAMP else CLAMP) * TWO) + ONE)  # (NaN: replaced)
    t = small if a < SMALL else big
    t = np.copysign(t, v)
    return v if v != v else t


@numba.njit(cache=True, inline="always")
def gelu_tanh32(v):
    """GELU, tanh form (Gemma's ``gelu_pytorch_tanh``), of a float32, as a float32."""
    inner = GELU_C * (v + GELU_CUBIC * v * v * v)
    return HALF * v * (ONE + tanh32(inner))


def exp32_array(x) -> np.ndarray:
    """``exp32`` of every value of ``x``, in NumPy (the same operations, the same bits)."""
    v = np.asarray(x, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        x = np.where(v < LOW, LOW, np.where(v > HIGH, HIGH, v))
        x = np.where(v != v, HIGH, x)
        n = np.floor(x * INV_LN2 + HALF)
        r = (x - n * LN2_HI) - n * LN2_LO
        q = ((((((E7 * r + E6) * r + E5) * r + E4) * r + E3) * r + E2) * r + E1) * r + ONE
        i = n.astype(np.int32)
        half = i >> np.int32(1)
        e = (q * _powers_of_two(half)) * _powers_of_two(i - half)
        return np.where(v != v, v, e).astype(np.float32, copy=False)


def _powers_of_two(n: np.ndarray) -> np.ndarray:
    return ((n + np.int32(127)) << np.int32(23)).view(np.float32)


def tanh32_array(x) -> np.ndarray:
    """``tanh32`` of every value of ``x``, in NumPy (the same operations, the same bits)."""
    v = np.asarray(x, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        a = np.abs(v)
        s = a * a
        p = ((((P5 * s + P4) * s + P3) * s + P2) * s + P1) * s + P0
        small = a + (a * s) * p
        big = ONE - TWO / (exp32_array(np.where(a < CLAMP, a, CLAMP) * TWO) + ONE)
        t = np.copysign(np.where(a < SMALL, small, big), v)
        return np.where(v != v, v, t).astype(np.float32, copy=False)


def gelu_tanh32_array(x) -> np.ndarray:
    """``gelu_tanh32`` of every value of ``x``, in NumPy (the same bits)."""
    v = np.asarray(x, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        inner = GELU_C * (v + GELU_CUBIC * v * v * v)
        return (HALF * v * (ONE + tanh32_array(inner))).astype(np.float32, copy=False)
