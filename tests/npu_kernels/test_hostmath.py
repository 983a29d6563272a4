"""Host math of fast mode: one summation order on any CPU; bf16 / column-major weights give
the same numbers as fp32 ones.

The products equal ``matmul_reference`` (NumPy, the same documented order) bit for bit, across
the row count where the tiling changes (one output at a time up to ``SMALL_M`` rows, register
tiles beyond) and for both host layouts, with Numba targeting this CPU and a generic x86-64
one (subprocesses: SSE2 vectors against this CPU's wider ones). They are also checked against
float64 NumPy on the very values held. The kernels' fast paths given compact weights must equal
their fast paths given the same values in fp32; the emulated cycles must not depend on the host
copy at all."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npu_emulator import NPU
from npu_emulator.memory import BF16, round_bf16
from npu_kernels import hostmath
from npu_kernels.embedding import embedding, embedding_fast
from npu_kernels.lm_head import lm_head, lm_head_fast
from npu_kernels.matmul import matmul
from npu_kernels.mlp import geglu_mlp_fast
from npu_kernels.rope import rope_fast, rope_tables
from tests.strategies import arrays, seeds, sizes

ROWS = st.sampled_from([1, 2, 3, hostmath.SMALL_M, hostmath.SMALL_M + 1, 40])


def held(w, dtype, layout):
    w = w.astype(dtype)
    return hostmath.column_major(w) if layout == "column" else np.ascontiguousarray(w)


# Products of every size up to 300, on weights held as the model holds them (fp32 or bf16, rows
# or columns contiguous).
matmul_cases = given(
    m=ROWS,
    k=sizes(max_value=300),
    n=sizes(max_value=300),
    dtype=st.sampled_from([np.float32, BF16]),
    layout=st.sampled_from(["row", "column"]),
    seed=seeds,
)


@settings(max_examples=60, deadline=None)
@matmul_cases
def test_matmul_matches_float64_on_the_values_held(m, k, n, dtype, layout, seed):
    a = arrays((m, k), seed)
    w = held(arrays((k, n), seed + 1), dtype, layout)
    got = hostmath.matmul(a, w)
    want = a.astype(np.float64) @ w.astype(np.float64)
    assert got.dtype == np.float32 and got.shape == (m, n)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.sqrt(k) * max(1.0, np.abs(want).max()))


@settings(max_examples=60, deadline=None)
@matmul_cases
def test_matmul_sums_in_the_documented_order(m, k, n, dtype, layout, seed):
    a = arrays((m, k), seed)
    w = held(arrays((k, n), seed + 1), dtype, layout)
    want = hostmath.matmul_reference(a, w)
    assert hostmath.matmul(a, w).tobytes() == want.tobytes()
    w1 = held(arrays((k, 7), seed + 2), dtype, layout)
    got, got1 = hostmath.matmul_pair(a, w, w1)  # two weights in one parallel loop: the same bits
    assert got.tobytes() == want.tobytes() and got1.tobytes() == hostmath.matmul_reference(a, w1).tobytes()


def test_matmul_refuses_operands_that_do_not_chain():
    with pytest.raises(ValueError, match=r"matmul: a \(2, 3\) and w \(4, 5\) do not chain"):
        hostmath.matmul(np.ones((2, 3), np.float32), np.ones((4, 5), np.float32))


# Run in a subprocess per target: products and the model path's fast kernels on fixed inputs,
# their bytes written to stdout's last line (hex), and the assembly of one product tile.
TARGET_SCRIPT = textwrap.dedent(
    """
    import numba, numpy as np
    from npu_kernels import hostmath
    from npu_kernels.attention_prefill import attention_prefill_fast
    from npu_kernels.mlp import geglu_mlp_fast
    from tests.npu_emulator.test_fixedmath import SPECIAL, jitted, sweep
    from tests.strategies import arrays

    @numba.njit
    def one_tile(a, wt, out):
        hostmath._dot_1x1(a, wt, out, 0, 0)

    one_tile(np.ones((1, 32), np.float32), np.ones((1, 32), np.uint16), np.empty((1, 1), np.float32))
    asm = "".join(one_tile.inspect_asm().values())
    outs = []
    for m, k, n in ((1, 640, 300), (3, 257, 64), (40, 100, 33)):
        a = arrays((m, k), m)
        for dtype in (np.float32, hostmath.BF16):
            outs.append(hostmath.matmul(a, hostmath.column_major(arrays((k, n), k), dtype)))
    x = arrays((5, 64), 1)
    ws = [hostmath.column_major(arrays(s, 2 + i), hostmath.BF16) for i, s in enumerate([(64, 96)] * 2 + [(96, 64)])]
    outs.append(geglu_mlp_fast(x, *ws, numerics="bf16"))
    q, kv, cache = arrays((7, 4, 32), 5), arrays((7, 2, 32), 6), arrays((1, 2, 16, 32), 7)
    outs.append(attention_prefill_fast(q, kv, kv, cache, cache, q_start=3, scale=0.2))
    for which in (0, 1, 2):  # exp, tanh, GELU (npu_emulator/fixedmath.py)
        outs.append(jitted(which, np.concatenate([sweep(104.0, 4099), SPECIAL])))
    print("ymm" in asm or "zmm" in asm)
    print(b"".join(o.astype(np.float32).tobytes() for o in outs).hex())
    """
)


def run_target(tmp_path, cpu_name):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / (cpu_name or "host"))}
    env.pop("NUMBA_CPU_NAME", None)
    env.pop("NUMBA_CPU_FEATURES", None)
    if cpu_name:
        env["NUMBA_CPU_NAME"] = cpu_name
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run(
        [sys.executable, "-c", TARGET_SCRIPT], cwd=root, env=env, capture_output=True, text=True, check=True
    )
    wide, values = done.stdout.split()[-2:]
    return wide == "True", values


def test_the_same_bits_on_a_generic_x86_64_target_and_on_this_cpu(tmp_path):
    """Numba compiled for a generic x86-64 (SSE2: 4-lane vectors, no FMA) and for this CPU
    (AVX2 or AVX-512: 8 or 16 lanes) give the same bits: products, the MLP and attention, exp,
    tanh and GELU."""
    generic_wide, generic = run_target(tmp_path, "generic")
    host_wide, host = run_target(tmp_path, None)
    assert not generic_wide  # the generic target really used no wider vectors
    if not host_wide:
        pytest.skip("this CPU has no AVX: both runs targeted the same vector width")
    assert generic == host


def test_layout_helpers():
    w = arrays((5, 7), 0)
    c = hostmath.column_major(w, hostmath.BF16)
    assert c.shape == (5, 7) and c.T.flags.c_contiguous and not c.flags.c_contiguous
    assert hostmath.transposed(c) and not hostmath.transposed(w)
    assert (c.astype(np.float32) == round_bf16(w)).all()


def test_lm_head_with_the_tied_embedding_view_in_bf16():
    """The LM head reading the (V, D) embedding transposed, in bf16, gives the logits and
    argmax of the same values in fp32 (C-ordered) to fp32 rounding."""
    emb = round_bf16(arrays((777, 48), 3))
    x = arrays((2, 48), 4)
    ids = np.arange(777, dtype=np.int32)
    want, want_ids = lm_head_fast(x, np.ascontiguousarray(emb.T), ids, softcap=30.0)
    got, got_ids = lm_head_fast(x, emb.astype(BF16).T, ids, softcap=30.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert (got_ids == want_ids).all()


def test_embedding_and_rope_read_bf16_tables_exactly():
    table = round_bf16(arrays((50, 12), 5))
    ids = np.array([3, 0, 49, 3], np.int64)
    assert (embedding_fast(ids, table.astype(BF16), scale=1.5) == embedding_fast(ids, table, scale=1.5)).all()
    cos, sin = (round_bf16(t) for t in rope_tables(64, 8, 10_000.0))
    x = arrays((4, 2, 8), 6)
    pos = np.array([0, 5, 63, 5], np.int32)
    want = rope_fast(x, cos, sin, pos)
    assert (rope_fast(x, cos.astype(BF16), sin.astype(BF16), pos) == want).all()


def test_geglu_mlp_with_column_major_bf16_weights():
    x = arrays((3, 32), 7)
    ws = [round_bf16(arrays(s, 8 + i)) for i, s in enumerate([(32, 48), (32, 48), (48, 32)])]
    want = geglu_mlp_fast(x, *ws)
    got = geglu_mlp_fast(x, *(hostmath.column_major(w, BF16) for w in ws))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


# ----------------------------------------------------------------------------- the device copy


def test_compact_copies_are_bf16_only_where_exact():
    w = arrays((6, 10), 9)
    fast = NPU("tiny", numerics="bf16")
    t = fast.to_device(w, name="w", compact=True, column_major=True)
    assert t.numpy().dtype == BF16 and t.numpy().T.flags.c_contiguous
    assert (t.numpy().astype(np.float32) == round_bf16(w)).all()
    # fp32 numerics keep fp32 values; tile mode keeps fp32 host copies (every check reads them).
    for npu in (NPU("tiny", numerics="fp32"), NPU("tiny", mode="tile")):
        d = npu.to_device(w, name="w", compact=True, column_major=True).numpy()
        assert d.dtype == np.float32 and d.T.flags.c_contiguous
    assert (NPU("tiny", numerics="fp32").to_device(w, compact=True).numpy() == w).all()
    # Device copies never alias the host array, unless asked for a view of stored data.
    w2 = w.copy()
    t2 = fast.to_device(w2, name="w2")
    w2[:] = 0
    assert (t2.numpy() == round_bf16(w)).all()
    table = fast.to_device(w, name="table", compact=True)  # C-ordered: its transpose is column-major
    alias = fast.to_device(table.numpy().T, name="head", compact=True, column_major=True, copy=False)
    assert np.shares_memory(alias.numpy(), table.numpy()) and alias.shape == (10, 6)


def test_allocation_is_released_when_the_copy_fails():
    npu = NPU("tiny")
    used = npu.dram.used
    with pytest.raises(ValueError):
        npu.to_device(np.array([["x"]], dtype=object), "fp32", name="bad")
    assert npu.dram.used == used
    npu.to_device(np.zeros((4, 4), np.float32), name="after")  # the allocator is still usable


def test_cycles_do_not_depend_on_the_host_copy():
    w = arrays((64, 96), 10)
    x = arrays((1, 64), 11)
    reports = []
    for compact, column in ((False, False), (True, True)):
        npu = NPU("tiny")
        out, rep = npu.run(matmul, x, npu.to_device(w, compact=compact, column_major=column))
        reports.append((rep.cycles, rep.to_dict()))
        np.testing.assert_allclose(out, round_bf16(round_bf16(x) @ round_bf16(w)), rtol=1e-2, atol=1e-2)
    assert reports[0] == reports[1]
    # The tied LM head as a view of the compact embedding: the same values, logits and cycles
    # as a separate fp32 copy.
    emb, x = arrays((40, 16), 12), arrays((1, 16), 13)
    ids = np.arange(40, dtype=np.int32)
    runs = []
    for compact in (False, True):
        npu = NPU("tiny")
        table = npu.to_device(emb, compact=compact)
        if compact:
            head = npu.to_device(table.numpy().T, compact=True, column_major=True, copy=False)
        else:
            head = npu.to_device(np.ascontiguousarray(emb.T))
        rows, rep_e = npu.run(embedding, np.array([1, 39], np.int32), table)
        (logits, tok), rep_h = npu.run(lm_head, x, head, ids)
        runs.append((rows, logits, tok, rep_e.cycles, rep_h.cycles))
    (r0, l0, t0, *c0), (r1, l1, t1, *c1) = runs
    assert (r0 == r1).all() and (t0 == t1).all() and c0 == c1
    np.testing.assert_allclose(l1, l0, rtol=0, atol=1e-5 * np.abs(l0).max())


@settings(max_examples=40, deadline=None)
@given(
    m=ROWS,
    k=sizes(max_value=100),
    n=sizes(max_value=100),
    dtype=st.sampled_from([np.float32, BF16]),
    seed=seeds,
)
def test_geglu_mlp_fast_is_its_parts(m, k, n, dtype, seed):
    """The GeGLU computed inside the gate and up products' parallel loop (geglu_mlp_fast) gives
    the bits of the products, then geglu_fast, then the stored h, then the down product."""
    from npu_emulator import as_stored
    from npu_kernels.matmul import geglu_fast

    x = arrays((m, k), seed)
    wg, wu = (held(arrays((k, n), seed + i), dtype, "column") for i in (1, 2))
    wd = held(arrays((n, k), seed + 3), dtype, "column")
    for numerics in ("bf16", "fp32"):
        g, u = hostmath.matmul(x, wg), hostmath.matmul(x, wu)
        want = hostmath.matmul(as_stored(geglu_fast(g, u), numerics), wd)
        assert geglu_mlp_fast(x, wg, wu, wd, numerics=numerics).tobytes() == want.tobytes()
