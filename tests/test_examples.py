"""Property test of the second worked example (examples/residual_rmsnorm.py): tile and fast
mode against the NumPy reference and each other, under both numerics, on one and four engines."""

import pathlib
import runpy

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from npu_emulator import NPU, round_bf16
from tests.strategies import arrays, chips, seeds, sizes

EXAMPLE = runpy.run_path(
    str(pathlib.Path(__file__).resolve().parent.parent / "examples" / "residual_rmsnorm.py")
)
kernel, reference = EXAMPLE["residual_rmsnorm"], EXAMPLE["residual_rmsnorm_reference"]

U_BF16 = 2.0**-8  # unit roundoff of bfloat16
U_FP32 = 2.0**-24


@settings(max_examples=40, deadline=None)
@given(
    rows=sizes(max_value=40, awkward=(1, 2, 3, 7, 9, 17, 33)),
    width=sizes(max_value=300, awkward=(1, 3, 15, 17, 63, 65, 257)),
    seed=seeds,
    cfg=chips,
    numerics=st.sampled_from(["bf16", "fp32"]),
)
def test_residual_rmsnorm_matches_reference_in_both_modes(rows, width, seed, cfg, numerics):
    x, r, w = arrays((rows, width), seed), arrays((rows, width), seed + 1), arrays((width,), seed + 2, 0.5)
    (h_tile, y_tile), rep_tile = NPU(cfg, mode="tile", numerics=numerics).run(kernel, x, r, w)
    (h_fast, y_fast), rep_fast = NPU(cfg, mode="fast", numerics=numerics).run(kernel, x, r, w)
    assert rep_tile == rep_fast
    assert rep_tile.cycles >= rep_tile.roofline_cycles
    # h passes through a device-dtype tile in both modes: bit for bit the same.
    np.testing.assert_array_equal(h_fast, h_tile)
    bf16 = numerics == "bf16"
    if bf16:  # the reference sees what the device holds: inputs, and h, rounded to bf16
        x, r, w = round_bf16(x), round_bf16(r), round_bf16(w)
    h_ref, y_ref = reference(x, r, w)
    if bf16:
        np.testing.assert_array_equal(h_tile, round_bf16(h_ref.astype(np.float32)))
        _, y_ref = reference(h_tile, np.zeros_like(h_tile), w)
    else:
        np.testing.assert_allclose(h_tile, h_ref, rtol=U_FP32, atol=0)
    # fp32 sums of `width` squares, a few roundings, and the bf16 output under bf16 numerics.
    tol = ((width + 8) * U_FP32 + (U_BF16 if bf16 else 0)) * np.abs(y_ref) + 1e-30
    for y in (y_tile, y_fast):
        assert np.all(np.abs(y - y_ref) <= tol)
