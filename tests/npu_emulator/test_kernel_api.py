"""The kernel author's contract with the NPU: numerics-aware fast functions, the fast-mode trace
checks, autotuning, input names, view reshapes, short config reprs."""

import pydoc

import numpy as np
import pytest
from hypothesis.vendor.pretty import pretty

import npu_kernels
from npu_emulator import (
    NPU,
    TINY,
    Kernel,
    KernelError,
    OutOfBoundsError,
    UninitializedReadError,
    as_stored,
    round_bf16,
    tiles,
)

RNG = np.random.default_rng(0)
X = RNG.standard_normal((24, 16)).astype(np.float32)


def cube_emit(k, x):
    """out = (x * x) * x, the square passing through a device-dtype (bf16) tile."""
    out = k.output(x.shape, name="out")
    xt, sq = k.alloc(x.shape, name="x"), k.alloc(x.shape, name="sq")
    acc = k.alloc(x.shape, "fp32", name="acc")
    k.dma(xt, x, queue=0)
    k.vector("mul", sq, xt, xt)  # rounded to bf16 under bf16 numerics
    k.vector("mul", acc, sq, xt)  # fp32
    k.vector("copy", xt, acc)
    k.dma(out, xt, queue=1)
    return out


def cube_fast(x, *, numerics):
    return as_stored(x * x, numerics) * x


@pytest.mark.parametrize("numerics", ["bf16", "fp32"])
def test_a_fused_kernel_matches_tile_mode_under_both_numerics(numerics):
    kernel = Kernel("cube", cube_emit, cube_fast)
    tile, rep_tile = NPU(TINY, mode="tile", numerics=numerics).run(kernel, X)
    fast, rep_fast = NPU(TINY, mode="fast", numerics=numerics).run(kernel, X)
    np.testing.assert_array_equal(fast, tile)
    assert rep_fast == rep_tile
    # Without the rounding of the intermediate, bf16 numerics tell the two modes apart.
    naive, _ = NPU(TINY, numerics=numerics).run(Kernel("cube", cube_emit, lambda x: x * x * x), X)
    assert np.array_equal(naive, tile) == (numerics == "fp32")


def test_as_stored_rounds_like_the_device():
    np.testing.assert_array_equal(as_stored(X, "bf16"), round_bf16(X))
    np.testing.assert_array_equal(as_stored(X, "bf16", "fp32"), X)
    np.testing.assert_array_equal(as_stored(X, "fp32"), X)
    with pytest.raises(ValueError, match="numerics must be 'bf16' or 'fp32', got 'fp16'"):
        as_stored(X, "fp16")


def test_an_fp32_device_passes_fp32_numerics_to_fast():
    seen = []
    kernel = Kernel("cube", cube_emit, lambda x, *, numerics: seen.append(numerics) or x)
    NPU(TINY, numerics="bf16", dtype="fp32").run(kernel, X)
    NPU(TINY, numerics="bf16").run(kernel, X)
    assert seen == ["fp32", "bf16"]


# ------------------------------------------------------------ fast-mode trace checks


def double_buffered(k, x, *, wrong_slot=False, half_tile=False, skip_last=False):
    """Copy x through two alternating SRAM slots, one row tile at a time, with optional bugs."""
    out = k.output(x.shape, name="out")
    slots = [k.alloc((8, x.shape[1]), name=f"slot{s}") for s in range(2)]
    steps = list(tiles(x.shape[0], 8))
    for i, (r0, rl) in enumerate(steps):
        s = i % 2
        cols = x.shape[1] // 2 if half_tile and i == 1 else x.shape[1]
        k.dma(slots[s][:rl, :cols], x[r0 : r0 + rl, :cols], queue=0)
        read = 1 - s if wrong_slot and i == 0 else s
        if not (skip_last and i == len(steps) - 1):
            k.dma(out[r0 : r0 + rl], slots[read][:rl], queue=1)
    return out


def copy_kernel():
    return Kernel("copy", double_buffered, lambda x, **_: x)


@pytest.mark.parametrize(
    "bug, error, match",
    [
        (
            "wrong_slot",
            UninitializedReadError,
            r"dma #1 slot1 -> out reads 'slot1' \(local SRAM of engine 0\)",
        ),
        ("half_tile", UninitializedReadError, r"reads 'slot1' .* at index \(0, 8\)"),
        ("skip_last", KernelError, r"left output 'out' \(24, 16\) unwritten, first at index \(16, 0\)"),
    ],
)
def test_fast_mode_catches_what_tile_mode_catches_with_the_same_message(bug, error, match):
    with pytest.raises(error, match=match) as tile:
        NPU(TINY, mode="tile").run(copy_kernel(), X, **{bug: True})
    with pytest.raises(error, match=match) as fast:
        NPU(TINY, mode="fast").run(copy_kernel(), X, **{bug: True})
    assert str(fast.value) == str(tile.value)


def test_a_read_of_unwritten_dram_scratch_raises_in_fast_mode():
    def emit(k, x):
        out = k.output(x.shape, name="out")
        scratch = k.dram(x.shape, name="scratch")
        t = k.alloc(x.shape, name="t")
        k.dma(t, x, queue=0)
        k.dma(scratch[:12], t[:12], queue=1)  # only the first 12 rows reach the scratch
        k.dma(t, scratch, queue=0)
        k.dma(out, t, queue=1)
        return out

    with pytest.raises(UninitializedReadError, match=r"reads 'scratch' \(DRAM\) at index \(12, 0\)"):
        NPU(TINY).run(Kernel("spill", emit, lambda x: x), X)


def test_fast_mode_checks_once_per_shape():
    traced = []

    def emit(k, x):
        traced.append(x.shape)
        return double_buffered(k, x)

    npu, kernel = NPU(TINY), Kernel("copy", emit, lambda x: x)
    for rows in (24, 24, 16, 24):
        out, _ = npu.run(kernel, X[:rows])
        np.testing.assert_array_equal(out, round_bf16(X[:rows]))
    assert traced == [(24, 16), (16, 16)]


# ------------------------------------------------------------------ autotuning


def tiled_copy(k, x, *, tile_rows):
    out = k.output(x.shape, name="out")
    t = [k.alloc((tile_rows, x.shape[1]), name=f"t{s}") for s in range(2)]
    for i, (r0, rl) in enumerate(tiles(x.shape[0], tile_rows)):
        k.dma(t[i % 2][:rl], x[r0 : r0 + rl], queue=0)
        k.dma(out[r0 : r0 + rl], t[i % 2][:rl], queue=1)
    return out


def test_autotune_keeps_the_fastest_candidate_once_per_shape_and_chip():
    calls = []

    def candidates(cfg, x):
        calls.append((cfg.name, x.name, x.shape, x.dtype))
        return [{"tile_rows": r} for r in (1, 8, 4, 9000)]  # 9000 rows do not fit: skipped

    kernel = Kernel("tiled_copy", tiled_copy, lambda x: x, autotune=candidates)
    cycles = {}
    for r in (1, 8, 4):
        cycles[r] = NPU(TINY).plan(Kernel("probe", tiled_copy, None), [((24, 16), "bf16")], {"tile_rows": r})
    best = min(cycles, key=lambda r: cycles[r].report.cycles)
    for mode in ("tile", "fast", "tile"):
        out, rep = NPU(TINY, mode=mode).run(kernel, X)
        np.testing.assert_array_equal(out, round_bf16(X))
        assert rep.cycles == cycles[best].report.cycles
    assert calls == [("tiny", "x", (24, 16), "bf16")]  # tuned once for both modes
    NPU(TINY.replace(name="tiny-2q", dma_queues=2)).run(kernel, X)
    NPU(TINY).run(kernel, X[:16])
    assert [c[0] for c in calls] == ["tiny", "tiny-2q", "tiny"] and calls[-1][2] == (16, 16)
    assert kernel.tune(TINY, [NPU(TINY).to_device(X, name="x").buffer], {}) == {"tile_rows": best}


def test_autotune_with_no_runnable_candidate_says_why():
    kernel = Kernel("tiled_copy", tiled_copy, lambda x: x, autotune=lambda cfg, x: [{"tile_rows": 9000}])
    with pytest.raises(
        KernelError, match=r"no autotune candidate runs on tiny .*\n  \{'tile_rows': 9000\}: Alloc"
    ):
        NPU(TINY).run(kernel, X)


# ------------------------------------------------------------ names, views, reprs


def test_inputs_are_named_after_the_emit_parameters(tmp_path):
    def emit(k, queries, keys):
        out = k.output(queries.shape, name="out")
        t = k.alloc(queries.shape, name="t")
        k.dma(t, queries, queue=0)
        k.dma(t, keys[0:4], queue=0)  # keys is (8, 16): a shape mismatch names it
        return out

    with pytest.raises(Exception, match=r"'keys' region \(4, 16\) and destination 't' region \(24, 16\)"):
        NPU(TINY).run(Kernel("named", emit, None), X, X[:8])
    _, rep = NPU(TINY, mode="tile").run(copy_kernel(), X)
    assert rep.stream.labels[0] == "dma #0 x -> slot0"


def test_views_reshape_where_the_strides_allow():
    def emit(k, x):
        out = k.output((12, 32), name="out")
        t = k.alloc((24, 16), name="t")
        k.dma(t, x, queue=0)
        k.dma(out, t.reshape(12, 32), queue=1)  # dense: any shape of 384 elements
        top = t[0:8].reshape(-1)  # a slice of whole rows is still dense
        assert top.shape == (128,) and top.strides == (1,)
        split = t[:, 0:8].reshape(24, 2, 4)  # columns split inside each row
        assert split.strides == (16, 4, 1)
        with pytest.raises(
            OutOfBoundsError, match=r"view \(24, 8\) with strides \(16, 1\) cannot become \(192,\)"
        ):
            t[:, 0:8].reshape(192)
        with pytest.raises(
            OutOfBoundsError, match=r"view \(24, 16\) \(384 elements\) cannot become \(5, 5\)"
        ):
            t.reshape(5, 5)
        return out

    out, _ = NPU(TINY, mode="tile").run(Kernel("reshape", emit, None), X)
    np.testing.assert_array_equal(out, round_bf16(X).reshape(12, 32))


def test_help_on_a_library_kernel_shows_its_module_docstring():
    text = pydoc.render_doc(npu_kernels.softmax, renderer=pydoc.plaintext)
    assert "Row-wise softmax, numerically stable" in text
    assert "Kernel 'softmax' of npu_kernels.softmax" in text


def test_config_repr_is_short():
    assert repr(TINY) == "NPUConfig('tiny')"
    assert repr(TINY.replace(num_engines=2)) == "NPUConfig('tiny', num_engines=2)"
    assert repr(TINY.replace(name="t2", dma_queues=2)) == "NPUConfig('t2', tiny with dma_queues=2)"
    # What hypothesis prints for a falsifying example's chip.
    assert pretty(TINY.replace(num_engines=2)) == "NPUConfig('tiny', num_engines=2)"
