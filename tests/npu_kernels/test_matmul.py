import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npu_emulator import NPU, TINY, round_bf16
from npu_emulator.dma import RES_DRAM
from npu_kernels.matmul import (
    Epilogue,
    Tiling,
    choose_tiling,
    footprint,
    gelu_tanh_reference,
    linear,
    linear_reference,
    matmul,
    matmul_reference,
    stage_bytes,
)
from tests.strategies import TINY4, arrays, chips, matmul_shapes, seeds

# On TINY4 the engine grid and the shared-SRAM staging run at test sizes.

U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
U_FP32 = 2.0**-24


def magnitude(a, b):
    return np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64)


def roofline_moved(rep, cfg):
    return max(rep.flops / cfg.peak_flops_per_cycle, rep.dram_bytes / cfg.dram_bytes_per_cycle)


def check_fp32_both_modes(shape, seed, cfg):
    m, k, n = shape
    a, b = arrays((m, k), seed), arrays((k, n), seed + 1)
    ref = matmul_reference(a, b)
    reports = []
    for mode in ("tile", "fast"):
        out, rep = NPU(cfg, mode=mode, numerics="fp32").run(matmul, a, b)
        # fp32 sums of K products in any order: |error| <= K * u32 * sum |a||b| (plus a little).
        assert np.all(np.abs(out - ref) <= 2 * k * U_FP32 * magnitude(a, b) + 1e-30), mode
        reports.append(rep)
    tile, fast = reports
    assert tile == fast  # identical cycle reports: same stream, same schedule
    assert tile.flops == 2 * m * k * n
    assert tile.cycles >= roofline_moved(tile, cfg)


@settings(max_examples=40, deadline=None)
@given(shape=matmul_shapes(), seed=seeds, cfg=chips)
def test_fp32_both_modes_equal_numpy_and_each_other(shape, seed, cfg):
    check_fp32_both_modes(shape, seed, cfg)


# Found by hypothesis: one output column block and four engines left no engine grid to choose.
@pytest.mark.parametrize("shape, cfg", [((1, 1, 1), TINY4)])
def test_fp32_regressions(shape, cfg):
    check_fp32_both_modes(shape, 0, cfg)


@settings(max_examples=25, deadline=None)
@given(shape=matmul_shapes(), seed=seeds, cfg=chips)
def test_bf16_within_bf16_tolerance(shape, seed, cfg):
    m, k, n = shape
    a, b = arrays((m, k), seed), arrays((k, n), seed + 1)
    ref = matmul_reference(a, b)
    for mode in ("tile", "fast"):
        out, _ = NPU(cfg, mode=mode, numerics="bf16").run(matmul, a, b)
        # Each input is rounded to bf16 (relative error u each, so 2u per product) and the
        # output once more (u of |ref| <= sum |a||b|): 3u of sum |a||b| bounds it.
        assert np.all(np.abs(out - ref) <= 3 * U_BF16 * magnitude(a, b) + 1e-30), mode
        np.testing.assert_array_equal(out, round_bf16(out))  # what a bf16 tensor holds


@settings(max_examples=25, deadline=None)
@given(shape=matmul_shapes(), cfg=chips)
def test_report_bytes_equal_what_the_descriptors_moved(shape, cfg):
    m, k, n = shape
    rep = NPU(cfg).plan(matmul, [((m, k), "bf16"), ((k, n), "bf16")], {}).report
    s = rep.stream
    dma = s.is_dma
    assert sum(rep.bytes_by_path.values()) == s.nbytes[dma].sum()
    assert rep.dram_bytes == s.nbytes[dma & ((s.res & RES_DRAM) != 0)].sum()
    # The output leaves once; each input arrives at least once.
    assert rep.bytes_by_path["local->dram"] == m * n * 2
    from_dram = rep.bytes_by_path.get("dram->local", 0) + rep.bytes_by_path.get("dram->shared", 0)
    assert from_dram >= (m * k + k * n) * 2
    assert rep.cycles >= roofline_moved(rep, cfg)
    assert rep.io_bytes == (m * k + k * n + m * n) * 2


@pytest.mark.parametrize("shape", [(8, 256, 256), (16, 128, 320)])
def test_double_buffering_beats_single_buffering(shape):
    m, k, n = shape
    sig = [((m, k), "bf16"), ((k, n), "bf16")]
    npu = NPU(TINY)
    single = npu.plan(matmul, sig, {"depth": 1}).report
    double = npu.plan(matmul, sig, {"depth": 2}).report
    # DMA and compute are comparable here: one b tile takes about as long to load as to use
    # (loads are dealt over the engine's queues: compare with the busiest).
    busy = double.unit_busy
    assert 0.3 < busy["engine0.matrix"] / max(v for u, v in busy.items() if u.startswith("dma")) < 3
    assert double.cycles < 0.85 * single.cycles


def test_outputs_in_fp32_when_asked():
    a, b = arrays((5, 40), 1), arrays((40, 7), 2)
    out, rep = NPU(TINY, mode="tile", numerics="bf16").run(matmul, a, b, out_dtype="fp32")
    ref = round_bf16(a).astype(np.float64) @ round_bf16(b)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert rep.bytes_by_path["local->dram"] == 5 * 7 * 4


# ------------------------------------------------------------------ linear: fused epilogue

ACTIVATIONS = st.sampled_from([None, "gelu_tanh"])
GELU_LIPSCHITZ = 1.13  # max |gelu_tanh'(z)| is 1.129


def linear_bound(a, b, bias, z, activation, u_store):
    """Elementwise bound on |out - reference|: inputs rounded once (u_store each, 0 in fp32
    numerics), fp32 sums of K products plus the bias, then gelu_tanh (1.13-Lipschitz, plus a few
    fp32 roundings of |z| (1 + |z|) from its evaluation on the SFU), then the output rounded."""
    k = a.shape[1]
    mag = magnitude(a, b) + np.abs(bias)
    dz = (2 * u_store + (k + 2) * U_FP32) * mag
    if activation == "gelu_tanh":
        dz = GELU_LIPSCHITZ * dz + 8 * U_FP32 * np.abs(z) * (1 + np.abs(z))
    out = gelu_tanh_reference(z) if activation else z
    return dz + u_store * (np.abs(out) + dz)


@settings(max_examples=25, deadline=None)
@given(
    shape=matmul_shapes(),
    seed=seeds,
    cfg=chips,
    activation=ACTIVATIONS,
    numerics=st.sampled_from(["fp32", "bf16"]),
)
def test_linear_both_modes_equal_numpy_and_each_other(shape, seed, cfg, activation, numerics):
    m, k, n = shape
    a, b, bias = arrays((m, k), seed), arrays((k, n), seed + 1), arrays((n,), seed + 2)
    ref = linear_reference(a, b, bias, activation=activation)
    z = a.astype(np.float64) @ b + bias
    bound = linear_bound(a, b, bias, z, activation, U_BF16 if numerics == "bf16" else 0.0)
    reports = []
    for mode in ("tile", "fast"):
        out, rep = NPU(cfg, mode=mode, numerics=numerics).run(linear, a, b, bias, activation=activation)
        # Twice the first-order bound covers the second-order terms it leaves out.
        assert np.all(np.abs(out - ref) <= 2 * bound + 1e-30), mode
        reports.append(rep)
    tile, fast = reports
    assert tile == fast
    assert tile.flops == 2 * m * k * n
    assert tile.cycles >= roofline_moved(tile, cfg)
    assert tile.io_bytes == (m * k + k * n + n + m * n) * 2


@settings(max_examples=10, deadline=None)
@given(shape=matmul_shapes(), seed=seeds, cfg=chips)
def test_matmul_with_activation(shape, seed, cfg):
    m, k, n = shape
    a, b = arrays((m, k), seed), arrays((k, n), seed + 1)
    z = a.astype(np.float64) @ b
    ref = matmul_reference(a, b, activation="gelu_tanh")
    bound = linear_bound(a, b, np.zeros(n), z, "gelu_tanh", 0.0)
    reports = []
    for mode in ("tile", "fast"):
        out, rep = NPU(cfg, mode=mode, numerics="fp32").run(matmul, a, b, activation="gelu_tanh")
        assert np.all(np.abs(out - ref) <= 2 * bound + 1e-30), mode
        reports.append(rep)
    assert reports[0] == reports[1]


@pytest.mark.parametrize("activation", [None, "gelu_tanh"])
@pytest.mark.parametrize("cfg", [TINY, TINY4], ids=["tiny", "tiny4"])
def test_linear_epilogue_is_fused(cfg, activation):
    """Bias and activation cost no extra pass: with the same tiling as the plain matmul, the only
    extra DRAM traffic is each engine's bias columns, the output leaves once, and the epilogue is
    one instruction per chunk, as the plain cast."""
    m, k, n = 40, 100, 90
    t = choose_tiling(cfg, m, k, n, epilogue=Epilogue(bias=True, activation=activation))
    sig = [((m, k), "bf16"), ((k, n), "bf16")]
    plain = NPU(cfg).plan(matmul, sig, {"tiling": t}).report
    fused = NPU(cfg).plan(linear, sig + [((n,), "bf16")], {"activation": activation, "tiling": t}).report
    assert fused.bytes_by_path["local->dram"] == m * n * 2
    assert fused.dram_bytes - plain.dram_bytes == t.gm * n * 2  # every row block reads all of bias
    op = f"activation.{activation}" if activation else "vector.add"
    assert fused.instructions[op] == plain.instructions["vector.copy"]
    assert "vector.copy" not in fused.instructions


# ------------------------------------------------------------------ every knob of the plan

# Each knob where it matters: staging both operands with queues kept for it (the engines then
# share the rest) and without; chunks and pieces; several panels; columns split evenly; one
# and three buffers; several row tiles (M > matmul_max_m = 64); a not resident (little local
# SRAM); an uneven last column block (its engine has fewer chunks than the staging unit).
SMALL_LOCAL = TINY.replace(name="tiny-24k", local_sram_bytes=24 << 10)
KNOBS = [
    (TINY4, (70, 100, 90), Tiling(2, 2, 32, 24, 2, True, True, tc=8, kc=16, stage_queues=2, ahead=4)),
    (TINY4, (70, 100, 90), Tiling(2, 2, 32, 48, 2, True, True, tc=16, even=True, ahead=1)),
    (TINY4, (2, 79, 51), Tiling(2, 2, 8, 16, 2, True, True, tc=8, stage_queues=2, ahead=4)),
    (TINY4, (3, 129, 65), Tiling(1, 4, 64, 16, 3, True, False, tc=8, kc=8, even=True, ahead=2)),
    (TINY4, (17, 63, 129), Tiling(4, 1, 64, 64, 1, False, True, stage_queues=2, ahead=3)),
    (TINY, (130, 65, 70), Tiling(1, 1, 16, 40, 2, tc=8, kc=8)),
    (SMALL_LOCAL, (70, 129, 30), Tiling(1, 1, 16, 16, 2, tc=8, kc=8)),
]
A_PASSES = {SMALL_LOCAL.name: 2}  # a not resident: read once per panel (two of 16 columns)


@pytest.mark.parametrize("cfg, shape, t", KNOBS, ids=[f"{c.name}-{s}" for c, s, _ in KNOBS])
def test_every_tiling_knob_computes_the_product(cfg, shape, t):
    """Explicit tilings (not only the ones the tuner picks) give the reference values in both
    modes, and allocate exactly the SRAM the tuner budgets for them."""
    m, k, n = shape
    a, b, bias = arrays((m, k), 1), arrays((k, n), 2), arrays((n,), 3)
    ref = linear_reference(a, b, bias, activation="gelu_tanh")
    z = a.astype(np.float64) @ b + bias
    bound = linear_bound(a, b, bias, z, "gelu_tanh", 0.0)
    reports = []
    for mode in ("tile", "fast"):
        npu = NPU(cfg, mode=mode, numerics="fp32")
        out, rep = npu.run(linear, a, b, bias, activation="gelu_tanh", tiling=t)
        assert np.all(np.abs(out - ref) <= 2 * bound + 1e-30), mode
        reports.append(rep)
    assert reports[0] == reports[1]
    rep = reports[0]
    ep = Epilogue(bias=True, activation="gelu_tanh")
    assert max(rep.peak_local_sram) == footprint(cfg, m, k, n, t, 2, 2, ep)
    assert rep.peak_shared_sram == stage_bytes(cfg, m, k, n, t, 2)
    # Staged operands leave DRAM once; the output once.
    assert rep.bytes_by_path["local->dram"] == m * n * 2
    from_dram = rep.bytes_by_path.get("dram->local", 0) + rep.bytes_by_path.get("dram->shared", 0)
    a_reads = (1 if t.stage_a else t.gn) * A_PASSES.get(cfg.name, 1)
    b_reads = 1 if t.stage_b else t.gm
    assert from_dram == (m * k * a_reads + k * n * b_reads) * 2 + t.gm * n * 2  # + bias per row block


# Gemma 3 270M's attention projections on atom: the rows below the goal before the tiles were
# cut into chunks and pieces (84 %, 79 % and 83 % of roofline).
@pytest.mark.parametrize("shape", [(256, 640, 1536), (256, 1024, 640), (1, 1024, 640)])
def test_gemma3_270m_projections_on_atom_near_roofline(shape):
    m, k, n = shape
    rep = NPU("atom").plan(matmul, [((m, k), "bf16"), ((k, n), "bf16")], {}).report
    assert rep.pct_of_roofline >= 85.0, rep
