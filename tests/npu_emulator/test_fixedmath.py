"""exp, tanh and GELU as fixed fp32 operations (npu_emulator/fixedmath.py): the jitted scalars
equal their NumPy twins bit for bit, they are within 1 unit in the last place of the correctly
rounded functions, and their edges (zeros, infinities, NaN, overflow, underflow, the branch
point) are right. The same bits on a generic x86-64 target: tests/npu_kernels/test_hostmath.py."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from npu_emulator.fixedmath import (
    SMALL,
    exp32,
    exp32_array,
    gelu_tanh32,
    gelu_tanh32_array,
    tanh32,
    tanh32_array,
)


@numba.njit(cache=True)
def _each(which, x, out):
    for i in range(x.shape[0]):
        if which == 0:
            out[i] = exp32(x[i])
        elif which == 1:
            out[i] = tanh32(x[i])
        else:
            out[i] = gelu_tanh32(x[i])


def jitted(which: int, x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    _each(which, x, out)
    return out


def sweep(top: float, step: int = 1021) -> np.ndarray:
    """Every ``step``-th fp32 value from 0 up to ``top``, with both signs."""
    up = np.arange(0, np.float32(top).view(np.uint32), step, dtype=np.uint32).view(np.float32)
    return np.concatenate([up, -up])


SPECIAL = np.float32(
    [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45, 1e-38, 88.72, 88.73, 89.0, 1e30]
    + [-87.3, -103.2, -103.9, -104.0, -105.0, -1e30, np.log(2) / 2, 9.0, 9.02, 10.0, 3.4e38]
    + [np.nextafter(SMALL, np.float32(0)), SMALL, np.nextafter(SMALL, np.float32(1))]
)


def ulps(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Distance in units in the last place between same-signed finite fp32 values."""
    return np.abs(got.view(np.int32).astype(np.int64) - want.view(np.int32).astype(np.int64))


def correctly_rounded(f, x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", under="ignore"):
        return f(x.astype(np.float64)).astype(np.float32)


@pytest.mark.parametrize(
    "which, array, top",
    [(0, exp32_array, 104.0), (1, tanh32_array, 12.0), (2, gelu_tanh32_array, 12.0)],
    ids=["exp", "tanh", "gelu"],
)
def test_jitted_equals_numpy_bit_for_bit(which, array, top):
    x = np.concatenate(
        [sweep(top), SPECIAL, np.random.default_rng(which).standard_normal(10_000, np.float32)]
    )
    assert jitted(which, x).tobytes() == array(x).tobytes()


def test_exp_within_one_ulp_of_the_correctly_rounded_exp():
    x = np.concatenate([sweep(104.0), SPECIAL])
    x = x[np.isfinite(x)]
    got, want = exp32_array(x), correctly_rounded(np.exp, x)
    assert ulps(got, want).max() <= 1  # subnormal results included (they count in their ulps)
    assert (ulps(got, want) == 0).mean() > 0.98


def test_tanh_within_one_ulp_of_the_correctly_rounded_tanh():
    x = np.concatenate([sweep(12.0, 257), SPECIAL])
    x = x[np.isfinite(x)]
    got, want = tanh32_array(x), correctly_rounded(np.tanh, x)
    assert ulps(got, want).max() <= 1
    assert (ulps(got, want) == 0).mean() > 0.99


def test_edges():
    e = exp32_array(np.float32([0.0, -0.0, np.inf, -np.inf, np.nan, 89.0, -105.0, 1e-45]))
    np.testing.assert_array_equal(e[[0, 1, 2, 3, 5, 6, 7]], np.float32([1, 1, np.inf, 0, np.inf, 0, 1]))
    assert np.isnan(e[4])
    t = tanh32_array(np.float32([0.0, -0.0, np.inf, -np.inf, np.nan, 10.0, -30.0, 1e-45, -1e-45]))
    assert t.view(np.uint32)[:2].tolist() == np.float32([0.0, -0.0]).view(np.uint32).tolist()  # signed zeros
    np.testing.assert_array_equal(t[[2, 3, 5, 6, 7, 8]], np.float32([1, -1, 1, -1, 1e-45, -1e-45]))
    assert np.isnan(t[4])
    # tanh is odd, exactly; the NaN's sign is kept
    x = sweep(12.0, 4099)
    np.testing.assert_array_equal(tanh32_array(-x), -tanh32_array(x))
    assert np.signbit(tanh32_array(np.float32([-np.nan]))[0])


def test_gelu_is_the_tanh_formula_in_fp32():
    x = np.concatenate([sweep(12.0, 8191), np.random.default_rng(1).standard_normal(10_000, np.float32) * 4])
    want = (
        0.5
        * x.astype(np.float64)
        * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x.astype(np.float64) ** 3)))
    )
    got = gelu_tanh32_array(x).astype(np.float64)
    # four fp32 operations before tanh (relative 2^-24 each, through tanh's slope <= 1) and
    # three after: bounded by a few ulps of |x| (the sum 1 + tanh cancels where x << 0)
    assert np.all(np.abs(got - want) <= 8 * 2.0**-24 * np.maximum(np.abs(x), 1e-30))
