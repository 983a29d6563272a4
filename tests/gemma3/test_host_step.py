"""The host shortcuts of gemma3/host_step.py: the same emulated cycles and the same numbers.

A padded prefill chunk computes only its valid rows in fast mode; its cost stays the padded
chunk's plans, kernel by kernel, and its logits those of the padded computation, bit for bit.
A decode step runs one jitted pass per layer (gemma3/host_fused.py); its tokens, logits and
reports are the per-kernel path's, bit for bit, and its parts equal the kernels' fast functions.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemma3 import NPUGemma3ForCausalLM, host_fused
from gemma3.host_step import run_valid_rows
from npu_emulator import NPU, KernelError
from npu_emulator.memory import round_bf16
from npu_kernels.attention_decode import attention_decode_fast
from npu_kernels.matmul import matmul
from npu_kernels.mlp import geglu_mlp
from tests.gemma3.oracle import tiny_model
from tests.strategies import arrays, seeds

RBLN = dict(rbln_npu="tiny", rbln_prefill_chunk_size=64, rbln_max_seq_len=160)


def run(model, ids, valid_rows_only, new=4):
    model.runtime.valid_rows_only = valid_rows_only
    out = model.generate(
        ids, max_new_tokens=new, eos_token_id=[], return_dict_in_generate=True, output_logits=True
    )
    reports = {p: [(r.name, r.cycles) for r in c.reports] for p, c in model.runtime.cost.items()}
    return out, reports


@pytest.mark.parametrize("numerics", ["bf16", "fp32"])
@pytest.mark.parametrize(
    "lengths", [[5], [70], [37, 12]]
)  # one short chunk, a full one and a short one, a batch
def test_valid_rows_cost_the_padded_chunk_and_give_its_logits(tmp_path, numerics, lengths):
    tiny_model(tmp_path, sliding_window=16)
    width = max(lengths)
    ids = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros_like(ids)
    rng = np.random.default_rng(0)
    for b, n in enumerate(lengths):
        ids[b, width - n :] = rng.integers(3, 300, size=n)
        mask[b, width - n :] = 1
    model = NPUGemma3ForCausalLM.from_pretrained(
        tmp_path, **RBLN, rbln_numerics=numerics, rbln_batch_size=len(lengths)
    )
    padded, padded_reports = run(model, ids, valid_rows_only=False)
    valid, valid_reports = run(model, ids, valid_rows_only=True)
    assert valid_reports == padded_reports
    np.testing.assert_array_equal(valid.sequences, padded.sequences)
    for ours, theirs in zip(valid.logits, padded.logits):
        np.testing.assert_array_equal(ours, theirs)  # each row on its own, in a fixed order (hostmath)


def test_valid_rows_are_costed_as_the_padded_chunk():
    npu = NPU("tiny")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((32, 24), dtype=np.float32)
    w = [rng.standard_normal(s, dtype=np.float32) for s in ((24, 40), (24, 40), (40, 24))]
    full, report = npu.run(geglu_mlp, x, *w)
    part, part_report = run_valid_rows(npu, geglu_mlp, [x[:7], *w], {}, padded_rows=32)
    assert part_report is report  # the padded chunk's plan, not a 7-row one
    np.testing.assert_array_equal(part, full[:7])


def test_valid_rows_refuse_mismatched_rows_and_tile_mode():
    x = np.ones((40, 8), np.float32)
    w = np.ones((8, 8), np.float32)
    with pytest.raises(KernelError, match=r"matmul: chunk-row inputs \(40, 8\) must all have <= 32 rows"):
        run_valid_rows(NPU("tiny"), matmul, [x, w], {}, padded_rows=32)
    with pytest.raises(KernelError, match="valid rows only are a fast-mode shortcut"):
        run_valid_rows(NPU("tiny", mode="tile"), matmul, [x[:4], w], {}, padded_rows=32)
    from npu_kernels.softmax import softmax

    with pytest.raises(NotImplementedError, match="running only the valid rows of kernel 'softmax'"):
        run_valid_rows(NPU("tiny"), softmax, [x[:4]], {}, padded_rows=32)


@pytest.mark.parametrize(
    "numerics, heads",
    [
        ("bf16", {}),  # the tiny model: 2 query heads per kv head, head_dim 16
        ("fp32", {}),
        # 4 query heads per kv head (Gemma 3 270M's), head_dim and hidden size no multiple of 16
        ("bf16", dict(num_key_value_heads=1, head_dim=24, hidden_size=40, query_pre_attn_scalar=24)),
        # 3 query heads per kv head: the scores' plain loop
        ("bf16", dict(num_attention_heads=3, num_key_value_heads=1, hidden_size=48)),
    ],
)
def test_host_decode_gives_the_per_kernel_path_s_reports_and_logits(tmp_path, numerics, heads):
    """Past a KV tile and past the sliding window's ring, a batch of two left-padded prompts."""
    tiny_model(tmp_path, sliding_window=16, **heads)
    rng = np.random.default_rng(2)
    ids = rng.integers(3, 300, size=(2, 9))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    model = NPUGemma3ForCausalLM.from_pretrained(tmp_path, **RBLN, rbln_numerics=numerics, rbln_batch_size=2)
    runs = []
    for host_decode in (None, model.runtime.host_decode):
        model.runtime.host_decode = host_decode
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=40,
            eos_token_id=[],
            return_dict_in_generate=True,
            output_logits=True,
        )
        runs.append((out, [(r.name, r.cycles) for r in model.runtime.cost["decode"].reports]))
    (per_kernel, per_kernel_reports), (host, host_reports) = runs
    assert host_reports == per_kernel_reports
    assert len(model.runtime.host_decode.steps) > 1  # several attention lengths were kept
    np.testing.assert_array_equal(host.sequences, per_kernel.sequences)
    for ours, theirs in zip(host.logits, per_kernel.logits):
        np.testing.assert_array_equal(ours, theirs)


def test_host_decode_refuses_a_full_cache(tmp_path):
    tiny_model(tmp_path)
    model = NPUGemma3ForCausalLM.from_pretrained(tmp_path, **RBLN)
    model.runtime.positions[:] = model.runtime.max_seq_len
    with pytest.raises(ValueError, match="a sequence reached max_seq_len 160"):
        model.runtime.decode(np.zeros(1, np.int64))


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 3, 4, 8]),
    head_dim=st.sampled_from([2, 16, 24, 34]),
    length=st.integers(1, 80),
    seed=seeds,
)
def test_fused_attention_is_the_kernel_s_fast_function(batch, kv_heads, group, head_dim, length, seed):
    """decode_layer's attention (score blocks, then each head's softmax and values) against
    attention_decode_fast, bit for bit: slots masked anywhere, whole blocks of them masked too,
    every group size of the score tiles and the plain loop, partial tiles and blocks."""
    hq = kv_heads * group
    q = arrays((batch, hq * head_dim), seed)
    k = arrays((batch, kv_heads, length + 3, head_dim), seed + 1)
    v = arrays((batch, kv_heads, length + 3, head_dim), seed + 2)
    rng = np.random.default_rng(seed)
    mask = np.where(rng.random((batch, length)) < 0.3, -np.inf, 0.0).astype(np.float32)
    mask[:, : min(length, host_fused.SLOTS)] = -np.inf  # a whole block of slots hidden
    mask[:, -1] = 0.0  # (every row sees a slot)
    scale = np.float32(head_dim**-0.5)
    blocks = -(-length // host_fused.SLOTS)
    s = np.empty((batch, hq, length), np.float32)
    top = np.empty((batch, hq, blocks), np.float32)
    for t in range(batch * kv_heads * blocks):
        host_fused._scores(t, q, k, mask, scale, hq, kv_heads, head_dim, s, top)
    for bf16 in (True, False):
        out = np.empty((batch, hq * head_dim), np.float32)
        for t in range(batch * hq):
            host_fused._attend(t, s, top, v, kv_heads, head_dim, bf16, out)
        want = attention_decode_fast(q.reshape(batch, hq, head_dim), k, v, mask, scale=scale)
        want = round_bf16(want) if bf16 else want
        assert out.tobytes() == want.reshape(batch, -1).tobytes()


@pytest.mark.parametrize("numerics", ["bf16", "fp32"])
def test_greedy_decode_without_logits_gives_the_same_tokens_and_reports(tmp_path, numerics):
    """With no logits returned, decode steps give only their argmax (the LM head's int8 screen
    on the host path, npu_kernels/lm_head.py): the tokens and reports of a run returning them."""
    tiny_model(tmp_path, sliding_window=16)
    rng = np.random.default_rng(5)
    ids = rng.integers(3, 300, size=(2, 9))
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    model = NPUGemma3ForCausalLM.from_pretrained(tmp_path, **RBLN, rbln_numerics=numerics, rbln_batch_size=2)
    model.runtime.host_decode.screen_after = 30  # (the 270M's 64, scaled to this run)
    runs = []
    for logits in (True, False):
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=40,
            eos_token_id=[],
            return_dict_in_generate=logits,
            output_logits=logits,
        )
        runs.append((out.sequences if logits else out, model.last_report.decode.cycles))
        assert (model.runtime.host_decode._screen is None) == logits  # made on first use
    (full, full_cycles), (top, top_cycles) = runs
    np.testing.assert_array_equal(top, full)
    assert top_cycles == full_cycles


def test_only_plain_argmax_steps_skip_the_logits(tmp_path):
    """min_new_tokens suppresses eos for the first steps (a processor): those decode steps
    compute logits, the later ones only the argmax; the tokens are those of a run with logits."""
    tiny_model(tmp_path)
    model = NPUGemma3ForCausalLM.from_pretrained(tmp_path, **RBLN)
    ids = np.random.default_rng(6).integers(3, 300, size=(1, 7))
    calls, depth = [], [0]

    def spy(method, name):
        def step(tokens, *more):  # the generate loop's calls (decode_top may run decode inside)
            calls.extend([name] if depth[0] == 0 else [])
            depth[0] += 1
            try:
                return method(tokens, *more)
            finally:
                depth[0] -= 1

        return step

    for name in ("decode", "decode_top"):
        setattr(model.runtime, name, spy(getattr(model.runtime, name), name))
    out = model.generate(ids, max_new_tokens=6, min_new_tokens=3, eos_token_id=[1])
    assert calls == ["decode"] * 2 + ["decode_top"] * 3
    calls.clear()
    full = model.generate(
        ids,
        max_new_tokens=6,
        min_new_tokens=3,
        eos_token_id=[1],
        return_dict_in_generate=True,
        output_scores=True,
    )
    assert calls == ["decode"] * 5
    np.testing.assert_array_equal(out, full.sequences)


def test_the_screen_is_made_for_a_generate_it_repays(tmp_path):
    """The LM head's screen is made when a generate expects at least ``screen_after`` greedy
    steps, and then serves the later, shorter ones too."""
    tiny_model(tmp_path)
    model = NPUGemma3ForCausalLM.from_pretrained(tmp_path, **RBLN)
    host = model.runtime.host_decode
    host.screen_after = 10
    ids = np.random.default_rng(7).integers(3, 300, size=(1, 5))
    short = model.generate(ids, max_new_tokens=10, eos_token_id=[])  # 9 decode steps
    assert host._screen is None
    model.generate(ids, max_new_tokens=11, eos_token_id=[])
    assert host._screen is not None
    np.testing.assert_array_equal(model.generate(ids, max_new_tokens=10, eos_token_id=[]), short)


def test_no_screen_under_a_final_softcap(tmp_path):
    """tanh can tie distinct logits, so a softcapped LM head is never screened: greedy steps
    without logits read it whole and give the tokens of a run returning logits."""
    tiny_model(tmp_path, final_logit_softcapping=0.5)
    model = NPUGemma3ForCausalLM.from_pretrained(tmp_path, **RBLN)
    assert model.runtime.c.final_logit_softcapping == 0.5
    host = model.runtime.host_decode
    host.screen_after = 1
    ids = np.random.default_rng(8).integers(3, 300, size=(1, 5))
    top = model.generate(ids, max_new_tokens=12, eos_token_id=[])
    assert host.screen() is None and host._screen is None
    full = model.generate(
        ids, max_new_tokens=12, eos_token_id=[], return_dict_in_generate=True, output_logits=True
    )
    np.testing.assert_array_equal(top, full.sequences)
