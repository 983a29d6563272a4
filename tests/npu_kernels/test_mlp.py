import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npu_emulator import NPU, TINY, round_bf16
from npu_kernels.matmul import gelu_tanh_reference
from npu_kernels.mlp import geglu_mlp, plan_mlp, siglip_mlp
from tests.strategies import TINY4, arrays, chips, matmul_shapes, seeds

# (T, D, F): T past matmul_max_m (64) on tiny, D past matmul_max_k, F past matmul_max_n, all
# biased to 1, primes and tile +- 1; small enough that tile mode (Python per instruction) is quick.
MLP_SHAPES = matmul_shapes(max_m=70, max_k=100, max_n=150)

U_BF16 = 2.0**-8  # unit roundoff of bfloat16
U_FP32 = 2.0**-24
GELU_LIPSCHITZ = 1.13  # max |gelu_tanh'(z)| is 1.129


def inputs(kind, t, d, f, seed):
    """x and weights scaled like a trained layer (unit-size pre-activations)."""
    x = arrays((t, d), seed)
    w1 = arrays((d, f), seed + 1, 1 / np.sqrt(d))
    w2 = arrays((f, d), seed + 2, 1 / np.sqrt(f))
    if kind == "geglu":
        return x, w1, arrays((d, f), seed + 3, 1 / np.sqrt(d)), w2
    return x, w1, arrays((f,), seed + 4), w2, arrays((d,), seed + 5)


def reference_and_bound(kind, args, u_store):
    """The float64 reference and an elementwise bound on |out - reference| by forward error
    analysis. ``u_store``: rounding unit of every value stored in the device dtype (inputs on
    upload, h, out): U_BF16 with bf16 numerics, 0 with fp32 numerics. Sums accumulate in fp32
    (U_FP32 per add, n terms -> n * U_FP32 of the sum of magnitudes)."""
    a = [v.astype(np.float64) for v in args]
    if kind == "geglu":
        x, w1, wu, w2 = a
        b1 = np.zeros(w1.shape[1])
        b2 = np.zeros(w2.shape[1])
    else:
        x, w1, b1, w2, b2 = a
    d, f = w1.shape
    g = x @ w1 + b1
    mg = np.abs(x) @ np.abs(w1) + np.abs(b1)
    dg = (2 * u_store + (d + 2) * U_FP32) * mg  # x, w1 (and b1) rounded once, fp32 sums
    act = gelu_tanh_reference(g)
    # gelu_tanh is 1.13-Lipschitz; its fp32 evaluation on the SFU (the polynomial, tanh, and
    # 1 + tanh cancelling for negative inputs) adds a few fp32 roundings of |g| (1 + |g|).
    dact = GELU_LIPSCHITZ * dg + 8 * U_FP32 * np.abs(g) * (1 + np.abs(g))
    if kind == "geglu":
        up = x @ wu
        dup = (2 * u_store + (d + 1) * U_FP32) * (np.abs(x) @ np.abs(wu))
        h = act * up
        dh = np.abs(act) * dup + np.abs(up) * dact + dact * dup + U_FP32 * np.abs(h)
    else:
        h, dh = act, dact
    dh = dh + u_store * (np.abs(h) + dh)  # h stored in the device dtype
    ref = h @ w2 + b2
    habs = np.abs(h) + dh
    dout = dh @ np.abs(w2) + (u_store + (f + 2) * U_FP32) * (habs @ np.abs(w2) + np.abs(b2))
    dout = dout + u_store * (np.abs(ref) + dout)  # out stored in the device dtype
    return ref, dout


KERNELS = {"geglu": geglu_mlp, "siglip": siglip_mlp}


def signature(args):
    return [(v.shape, "bf16") for v in args]


def roofline(rep, cfg):
    return max(rep.flops / cfg.peak_flops_per_cycle, rep.dram_bytes / cfg.dram_bytes_per_cycle)


def check(kind, shape, seed, cfg, numerics="fp32"):
    t, d, f = shape
    args = inputs(kind, t, d, f, seed)
    ref, bound = reference_and_bound(kind, args, U_BF16 if numerics == "bf16" else 0.0)
    reports = []
    for mode in ("tile", "fast"):
        out, rep = NPU(cfg, mode=mode, numerics=numerics).run(KERNELS[kind], *args)
        # Twice the first-order bound covers the second-order terms it leaves out.
        assert np.all(np.abs(out - ref) <= 2 * bound + 1e-30), (
            mode,
            float(np.max(np.abs(out - ref) / bound)),
        )
        if numerics == "bf16":
            np.testing.assert_array_equal(out, round_bf16(out))
        reports.append(rep)
    tile, fast = reports
    assert tile == fast  # one stream, one schedule
    assert tile.flops == 2 * t * d * f * (3 if kind == "geglu" else 2)
    assert tile.cycles >= roofline(tile, cfg)
    return tile


@settings(max_examples=25, deadline=None)
@given(shape=MLP_SHAPES, seed=seeds, cfg=chips)
def test_geglu_fp32_both_modes_equal_numpy_and_each_other(shape, seed, cfg):
    check("geglu", shape, seed, cfg)


# Found by hypothesis: the up phase's last column block is narrower, so its engine reached a
# b chunk cut to its width first and staged only that part of the chunk for every engine.
@pytest.mark.parametrize("shape, cfg", [((2, 79, 51), TINY4)])
def test_geglu_regressions(shape, cfg):
    check("geglu", shape, 0, cfg)


@settings(max_examples=25, deadline=None)
@given(shape=MLP_SHAPES, seed=seeds, cfg=chips)
def test_siglip_fp32_both_modes_equal_numpy_and_each_other(shape, seed, cfg):
    check("siglip", shape, seed, cfg)


@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(["geglu", "siglip"]), shape=MLP_SHAPES, seed=seeds, cfg=chips)
def test_bf16_within_bf16_tolerance(kind, shape, seed, cfg):
    check(kind, shape, seed, cfg, numerics="bf16")


# Chips that force the other plans: h cut into passes that fit shared SRAM; h in DRAM scratch
# (not even a few rows fit); local SRAM too small to split between the phases.
PASSES = TINY4.replace(name="tiny4-small-shared", shared_sram_bytes=16 << 10)
DRAM_H = TINY4.replace(name="tiny4-tiny-shared", shared_sram_bytes=4 << 10)
REUSE = TINY.replace(name="tiny-small-local", local_sram_bytes=12 << 10)


@pytest.mark.parametrize(
    "cfg, shape, want",
    [
        (PASSES, (40, 100, 150), dict(h_shared=True, split_local=True, rows=10)),
        (DRAM_H, (17, 129, 63), dict(h_shared=False)),
        (REUSE, (40, 100, 150), dict(split_local=False)),
    ],
)
@pytest.mark.parametrize("kind", ["geglu", "siglip"])
def test_plans_for_small_srams(kind, cfg, shape, want):
    t, d, f = shape
    plan = plan_mlp(cfg, t, d, f, "bf16", kind == "geglu", kind == "siglip", "gelu_tanh")
    for key, value in want.items():
        assert getattr(plan, key) == value, plan
    rep = check(kind, shape, 7, cfg)
    h_bytes = t * f * 2
    scratch = rep.bytes_by_path.get("local->dram", 0) - t * d * 2
    assert scratch == (0 if plan.h_shared else h_bytes)  # h written to DRAM once, or never


@pytest.mark.parametrize("kind", ["geglu", "siglip"])
def test_intermediate_never_touches_dram(kind):
    t, d, f = 33, 70, 130
    args = inputs(kind, t, d, f, 0)
    rep = NPU(TINY4).plan(KERNELS[kind], signature(args), {}).report
    assert rep.bytes_by_path["local->dram"] == t * d * 2  # only the output leaves
    assert "shared->dram" not in rep.bytes_by_path and "dram->dram" not in rep.bytes_by_path
    assert rep.io_bytes == sum(v.size for v in args) * 2 + t * d * 2


@pytest.mark.parametrize("t", [1, 256])
def test_gemma3_270m_on_atom_near_roofline(t):
    d, f = 640, 2048
    sig = [((t, d), "bf16"), ((d, f), "bf16"), ((d, f), "bf16"), ((f, d), "bf16")]
    rep = NPU("atom").plan(geglu_mlp, sig, {}).report
    assert rep.pct_of_roofline >= 85.0, rep
