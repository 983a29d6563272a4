"""Tensor parallelism (gemma3/tensor_parallel.py) on tiny random Gemma3 models built in code.

At TP 2, 3 and 4 (head counts that divide evenly and that do not, GQA, MQA, a GQA group cut
unevenly) the greedy tokens equal TP 1's and the logits are within 1e-5 of TP 1's in fp32
numerics; TP 2 also against transformers, text and image+text. The step's cycles equal
``gemma3.estimate`` at the same TP (one device's share plus the collectives), tile and fast
agree, the Ray backend gives the same tokens and cycles, and bad configurations are refused.
"""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from gemma3 import NPUGemma3ForCausalLM, NPUGemma3ForConditionalGeneration
from gemma3.config import Gemma3TextConfig
from gemma3.estimate import estimate
from gemma3.rbln_config import NPUGemma3ForConditionalGenerationConfig
from gemma3.runtime import Gemma3OnNPU
from gemma3.tensor_parallel import plan_shards, shard_weights, unshard_weights
from gemma3.weights import expected_shapes
from npu_emulator import AllocationError, get_preset
from tests.gemma3.oracle import tiny_model
from tests.gemma3.test_model import oracle_logits, prompt

TOL = 1e-5
NEW = 8
TINY = dict(rbln_npu="tiny", rbln_max_seq_len=128, rbln_prefill_chunk_size=64)
RBLN = dict(TINY, rbln_numerics="fp32")
TWO_LAYERS = {"num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"]}


def text_config(hq, hkv, **kw):
    d = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=hq,
        num_key_value_heads=hkv,
        head_dim=16,
        max_position_embeddings=512,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=16,
    )
    d.update(kw)
    return Gemma3TextConfig.from_dict(d)


# ----------------------------------------------------------------------------- the split


@pytest.mark.parametrize(
    "hq, hkv, tp",
    [
        (hq, hkv, tp)
        for hq, hkv in [(4, 2), (6, 2), (8, 2), (6, 6), (4, 1), (8, 4), (9, 3)]
        for tp in (2, 3, 4)
        if hq >= tp
    ],
)
def test_every_query_head_is_on_one_device_and_reads_its_own_kv_head(hq, hkv, tp):
    c = text_config(hq, hkv)
    shards = plan_shards(c, tp)
    assert [h for s in shards for h in s.q_heads] == list(range(hq))  # each once, in order
    group = hq // hkv
    for s in shards:
        nq, nk = len(s.q_heads), len(s.kv_heads)
        assert nq >= 1 and nq % nk == 0  # the GQA kernel's shape: a whole group per kv head
        for j, head in enumerate(s.q_heads):  # local head j reads local kv head j // (nq / nk)
            assert s.kv_heads[j // (nq // nk)] == head // group
    assert sum(s.ff[1] for s in shards) == c.intermediate_size
    assert sum(s.vocab[1] for s in shards) == c.vocab_size
    if hkv >= tp:  # kv heads are not replicated
        assert sorted(k for s in shards for k in s.kv_heads) == list(range(hkv))


@pytest.mark.parametrize("hq, hkv, tp", [(4, 2, 2), (6, 2, 4), (8, 2, 3), (4, 1, 4)])
def test_shards_join_back_into_the_weights(hq, hkv, tp):
    c = text_config(hq, hkv, hidden_size=48)
    rng = np.random.default_rng(0)
    shapes = expected_shapes(c)
    tensors = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    w = Gemma3OnNPU.device_weights(c, tensors.__getitem__)
    shards = plan_shards(c, tp)
    parts = [shard_weights(c, w, s) for s in shards]
    back = unshard_weights(c, shards, parts)
    assert set(back) == set(w)
    for name in w:
        np.testing.assert_array_equal(back[name], w[name], err_msg=name)


# ----------------------------------------------------------------------------- parity


def generate(directory, tp, ids, **rbln):
    model = NPUGemma3ForCausalLM.from_pretrained(
        directory, **{**RBLN, "rbln_tensor_parallel_size": tp, **rbln}
    )
    out = model.generate(
        ids, max_new_tokens=NEW, eos_token_id=[], return_dict_in_generate=True, output_logits=True
    )
    return model, out


@pytest.mark.parametrize(
    "name, overrides, tps",
    [
        ("gqa", {}, (2, 4)),  # 4 heads, 2 kv heads: at 4 each kv head on two devices
        ("uneven-heads", {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2}, (4,)),
        ("group-cut-unevenly", {"num_attention_heads": 8, "num_key_value_heads": 2}, (3,)),
        ("mqa", {"num_key_value_heads": 1}, (2, 4)),
        ("mha-uneven", {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 6}, (4,)),
    ],
)
def test_tokens_equal_and_logits_within_1e5_of_one_device(tmp_path, name, overrides, tps):
    tiny_model(tmp_path, **{**TWO_LAYERS, **overrides})
    ids = np.stack([prompt(70, seed=0), prompt(70, seed=1)])  # two chunks, the second padded
    _, ref = generate(tmp_path, 1, ids, rbln_batch_size=2)
    for tp in tps:
        model, out = generate(tmp_path, tp, ids, rbln_batch_size=2)
        np.testing.assert_array_equal(out.sequences, ref.sequences, err_msg=f"TP {tp}")
        for i, (a, b) in enumerate(zip(out.logits, ref.logits)):
            err = np.abs(a - b).max() / np.abs(b).max()
            assert err <= TOL, f"TP {tp} step {i}: {err:.2e}"
        split = model.last_report.splits["decode"]
        assert split["communication"] > 0 and sum(split.values()) == pytest.approx(1)


def test_tp2_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch", reason="the oracle extra is not installed")
    hf = tiny_model(tmp_path, num_attention_heads=4, num_key_value_heads=1)
    ids = prompt(40)[None]
    _, out = generate(tmp_path, 2, ids)
    with torch.no_grad():
        ref = hf.generate(torch.from_numpy(ids), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    np.testing.assert_array_equal(out.sequences, ref.numpy())
    theirs = oracle_logits(hf, out.sequences, np.ones_like(ids), NEW)
    for i, ours in enumerate(out.logits):
        assert np.abs(ours - theirs[i]).max() / np.abs(theirs[i]).max() <= 1e-4


def test_image_text_at_tp2_equals_tp1_and_transformers(tmp_path, tok_dir):
    from gemma3 import Gemma3Processor
    from tests.gemma3.test_multimodal import CASES, build, check_parity, small_inputs
    from tests.gemma3.test_multimodal import RBLN as IMAGE_RBLN

    vision, tokens, text, _, _ = CASES["one-image-mm4"]
    hf = build(tmp_path, tok_dir, vision, tokens, text)
    processor = Gemma3Processor.from_pretrained(tmp_path)
    inputs = small_inputs(processor)
    one = NPUGemma3ForConditionalGeneration.from_pretrained(tmp_path, **IMAGE_RBLN)
    two = NPUGemma3ForConditionalGeneration.from_pretrained(
        tmp_path, **IMAGE_RBLN, rbln_tensor_parallel_size=2
    )
    assert two.rbln_config.language_model.devices == 2 and two.runtime.group.num_devices == 2
    out_two = check_parity(two, hf, inputs)  # tokens equal transformers', logits within 1e-4
    out_one = one.generate(
        **inputs,
        max_new_tokens=len(out_two.logits),
        eos_token_id=[],
        output_logits=True,
        return_dict_in_generate=True,
    )
    np.testing.assert_array_equal(out_two.sequences, out_one.sequences)
    for a, b in zip(out_two.logits, out_one.logits):
        assert np.abs(a - b).max() / np.abs(b).max() <= TOL
    # The vision tower runs on device 0 alone: its encoding costs what it does on one device.
    assert two.last_report.image_encoding.cycles == one.last_report.image_encoding.cycles


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from tests.gemma3.test_multimodal import add_image_tokens
    from tests.gemma3.tokenizer_fixture import build_tokenizer

    directory = build_tokenizer(tmp_path_factory.mktemp("tok"))
    add_image_tokens(directory)
    return directory


# ----------------------------------------------------------------------------- cost


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gqa")
    tiny_model(directory)
    return directory


def test_cycles_equal_the_estimate_and_tile_equals_fast(gqa_dir):
    ids = (np.arange(70) % 290 + 3)[None].repeat(2, 0)
    rbln = dict(TINY, rbln_batch_size=2)
    workload = dict(batch=2, prompt_tokens=70, new_tokens=4, chunk=64, max_seq_len=128)
    results = {}
    for mode in ("fast", "tile"):
        model = NPUGemma3ForCausalLM.from_pretrained(
            gqa_dir, **rbln, rbln_tensor_parallel_size=2, rbln_mode=mode
        )
        tokens = model.generate(ids, max_new_tokens=4)
        reports = model.runtime.reports()
        results[mode] = (tokens.tolist(), reports["prefill"].cycles, reports["decode"].cycles)
    assert results["tile"] == results["fast"]
    e = estimate(gqa_dir / "config.json", "tiny", **workload, tp=2)
    assert (e.prefill.cycles, e.decode.cycles) == results["fast"][1:]
    one = estimate(gqa_dir / "config.json", "tiny", **workload)
    assert e.decode.cycles < one.decode.cycles  # two devices split the step's weights


def test_an_uneven_split_costs_what_the_estimate_plans(tmp_path):
    # 8 heads, 2 kv heads on 3 devices: 3, 3 and 2 query heads; the first two hold one kv head
    # per query head (their groups are cut unevenly), the estimate plans the busiest.
    tiny_model(tmp_path, num_attention_heads=8, num_key_value_heads=2, **TWO_LAYERS)
    ids = (np.arange(70) % 290 + 3)[None]
    model = NPUGemma3ForCausalLM.from_pretrained(
        tmp_path,
        **TINY,
        rbln_tensor_parallel_size=3,
    )
    model.generate(ids, max_new_tokens=3)
    reports = model.runtime.reports()
    e = estimate(
        tmp_path / "config.json",
        "tiny",
        batch=1,
        prompt_tokens=70,
        new_tokens=3,
        chunk=64,
        max_seq_len=128,
        tp=3,
    )
    assert (e.prefill.cycles, e.decode.cycles) == (reports["prefill"].cycles, reports["decode"].cycles)


def test_ray_backend_gives_the_same_tokens_and_cycles(gqa_dir, tmp_path):
    pytest.importorskip("ray", reason="the ray extra is not installed")
    ids = prompt(20)[None]
    rbln = dict(**TINY, rbln_tensor_parallel_size=2)
    local = NPUGemma3ForCausalLM.from_pretrained(gqa_dir, **rbln)
    remote = NPUGemma3ForCausalLM.from_pretrained(gqa_dir, **rbln, rbln_backend="ray")
    assert remote.runtime.backend == "ray"
    a, b = local.generate(ids, max_new_tokens=6), remote.generate(ids, max_new_tokens=6)
    np.testing.assert_array_equal(a, b)
    assert local.last_report.decode.cycles == remote.last_report.decode.cycles
    assert local.last_report.prefill.cycles == remote.last_report.prefill.cycles
    remote.save_pretrained(tmp_path / "saved")  # the weights come back from the actors
    again = NPUGemma3ForCausalLM.from_pretrained(tmp_path / "saved", rbln_tensor_parallel_size=1)
    np.testing.assert_array_equal(again.generate(ids, max_new_tokens=6), a)


def test_saved_at_tp2_loads_at_any_tp(gqa_dir, tmp_path):
    ids = prompt(30)[None]
    rbln = TINY
    two = NPUGemma3ForCausalLM.from_pretrained(gqa_dir, **rbln, rbln_tensor_parallel_size=2)
    want = two.generate(ids, max_new_tokens=6)
    two.save_pretrained(tmp_path / "c")
    for tp in (1, 2, 4):
        m = NPUGemma3ForCausalLM.from_pretrained(tmp_path / "c", rbln_tensor_parallel_size=tp)
        got = m.generate(ids, max_new_tokens=6)
        if tp == 2:
            np.testing.assert_array_equal(got, want)
        assert got.shape == want.shape


def test_a_model_too_big_for_one_device_fits_on_two(gqa_dir):
    rbln = dict(rbln_max_seq_len=128, rbln_prefill_chunk_size=64)
    one = NPUGemma3ForCausalLM.from_pretrained(gqa_dir, rbln_npu="tiny", **rbln)
    used = one.runtime.npu.dram.used
    small = dataclasses.replace(get_preset("tiny"), name="tiny-small-dram", dram_bytes=int(used * 0.75))
    with pytest.raises(AllocationError, match=r"DRAM of device 0 of 1|in DRAM"):
        NPUGemma3ForCausalLM.from_pretrained(gqa_dir, rbln_npu=small, **rbln)
    two = NPUGemma3ForCausalLM.from_pretrained(gqa_dir, rbln_npu=small, rbln_tensor_parallel_size=2, **rbln)
    ids = prompt(20)[None]
    np.testing.assert_array_equal(two.generate(ids, max_new_tokens=4), one.generate(ids, max_new_tokens=4))
    tight = dataclasses.replace(small, dram_bytes=int(used * 0.3))
    with pytest.raises(AllocationError, match=r"DRAM of device 0 of 2.*asked"):
        NPUGemma3ForCausalLM.from_pretrained(gqa_dir, rbln_npu=tight, rbln_tensor_parallel_size=2, **rbln)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "rbln, error, match",
    [
        (
            {"rbln_tensor_parallel_size": 8},
            ValueError,
            r"tensor_parallel_size 8 exceeds num_attention_heads 4",
        ),
        ({"rbln_num_devices": 2, "rbln_tensor_parallel_size": 4}, ValueError, r"differ"),
        ({"rbln_tensor_parallel_size": 0}, ValueError, r"tensor_parallel_size"),
        (
            {"rbln_tensor_parallel_size": 2, "rbln_backend": "mpi"},
            ValueError,
            r"backend must be 'local' or 'ray'",
        ),
    ],
)
def test_bad_configurations_are_refused(gqa_dir, rbln, error, match):
    with pytest.raises(error, match=match):
        NPUGemma3ForCausalLM.from_pretrained(gqa_dir, **RBLN, **rbln)


def test_ray_backend_without_ray_names_the_extra(gqa_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if not installed
    with pytest.raises(ImportError, match=r"npu-gemma3\[ray\]"):
        NPUGemma3ForCausalLM.from_pretrained(gqa_dir, **RBLN, rbln_tensor_parallel_size=2, rbln_backend="ray")


def test_image_text_config_hands_the_devices_to_the_language_model():
    c = NPUGemma3ForConditionalGenerationConfig(
        tensor_parallel_size=4, vision_tower={"tensor_parallel_size": 2}
    )
    assert c.language_model.devices == 4
    assert c.vision_tower.devices == 1  # dropped: the vision tower runs on one device
    own = NPUGemma3ForConditionalGenerationConfig(language_model={"num_devices": 2, "backend": "ray"})
    assert (own.language_model.devices, own.language_model.backend) == (2, "ray")


def test_cli_tp_prints_the_split(tmp_path):
    from tests.gemma3.tokenizer_fixture import build_tokenizer

    build_tokenizer(tmp_path)
    vocab = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"]
    tiny_model(tmp_path, vocab_size=len(vocab) + 8, **TWO_LAYERS)
    cmd = [sys.executable, "-m", "gemma3", "generate", "--model", str(tmp_path), "--npu", "tiny"]
    cmd += ["--prompt", "hello world", "--max-new-tokens", "3", "--tp", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    header = next(line for line in r.stdout.splitlines() if "communication" in line)
    assert header.split() == ["phase", "compute", "memory", "communication"]


def test_the_trace_shows_every_device_and_the_links(gqa_dir, tmp_path):
    model = NPUGemma3ForCausalLM.from_pretrained(
        gqa_dir,
        **TINY,
        rbln_tensor_parallel_size=2,
    )
    model.generate(prompt(20)[None], max_new_tokens=3)
    path = model.runtime.write_trace(tmp_path / "t.json", ("prefill", "decode"))
    doc = json.loads(open(path).read())
    rep = model.last_report
    assert doc["otherData"]["cycles"] == rep.prefill.cycles + rep.decode.cycles  # the critical path
    names = {e["args"]["name"] for e in doc["traceEvents"] if e.get("name") == "process_name"}
    assert {
        "device 0 kernels",
        "device 1 kernels",
        "device 0 engine 0",
        "device 1 DMA queues",
        "links",
    } <= names
    slices = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert any(e["cat"] == "collective" and e["name"] == "all_reduce" for e in slices)
    links = next(
        e["pid"]
        for e in doc["traceEvents"]
        if e.get("name") == "process_name" and e["args"]["name"] == "links"
    )
    assert any(e["pid"] == links for e in slices)  # the collectives' transfers
