"""Parity of the NPU model with transformers on tiny random Gemma3 models built in code.

Our greedy tokens must equal transformers' for 32 new tokens, and our logits at every step
must be within 1e-4 (relative to the logit scale) of transformers' logits for the same
sequence. The NPU runs with fp32 numerics here: the reference numerics the oracle computes in.
"""

import json

import numpy as np
import pytest

from gemma3 import NPUGemma3ForCausalLM, RBLNGemma3ForCausalLM
from tests.gemma3.oracle import tiny_model

torch = pytest.importorskip("torch", reason="the oracle extra is not installed")

NEW = 32
RBLN = dict(rbln_npu="tiny", rbln_numerics="fp32", rbln_prefill_chunk_size=64, rbln_max_seq_len=256)


def oracle_logits(model, sequences, prompt_mask, n_steps):
    """transformers' logits for the last prompt position and each generated position."""
    seq = torch.from_numpy(np.asarray(sequences))
    mask = torch.ones_like(seq)
    mask[:, : prompt_mask.shape[1]] = torch.from_numpy(prompt_mask)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(seq, attention_mask=mask, position_ids=position_ids).logits.numpy()
    start = prompt_mask.shape[1] - 1
    return [logits[:, start + i] for i in range(n_steps)]


def check_parity(tmp_path, prompts, overrides=None, rewrite_config=None, new=NEW, **rbln):
    hf = tiny_model(tmp_path, **(overrides or {}))
    if rewrite_config:
        cfg = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps(rewrite_config(cfg)))
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros_like(ids)
    for b, p in enumerate(prompts):  # left padding
        ids[b, width - len(p) :] = p
        mask[b, width - len(p) :] = 1
    model = NPUGemma3ForCausalLM.from_pretrained(
        tmp_path, **{**RBLN, "rbln_batch_size": len(prompts), **rbln}
    )
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new,
        eos_token_id=[],
        return_dict_in_generate=True,
        output_logits=True,
    )
    with torch.no_grad():
        ref = hf.generate(
            torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
    np.testing.assert_array_equal(out.sequences, ref.numpy())
    steps = oracle_logits(hf, out.sequences, mask, new)
    for i, (ours, theirs) in enumerate(zip(out.logits, steps)):
        scale = np.abs(theirs).max()
        assert np.abs(ours - theirs).max() <= 1e-4 * scale, (
            f"step {i}: {np.abs(ours - theirs).max() / scale:.2e}"
        )
    return model


def prompt(n, seed=0):
    return np.random.default_rng(seed).integers(3, 300, size=n)


@pytest.mark.parametrize(
    "name, overrides, lengths",
    [
        ("gqa-short", {}, [20]),
        ("mqa-one-chunk", {"num_key_value_heads": 1}, [64]),
        ("window-smaller-than-prompt-two-chunks", {"sliding_window": 16}, [100]),
        ("softcap", {"final_logit_softcapping": 5.0}, [30]),
        (
            "linear-rope",
            {
                "rope_parameters": {
                    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                }
            },
            [40],
        ),
        ("batch-of-two-left-padded", {}, [37, 12]),
    ],
)
def test_greedy_tokens_and_logits_match_transformers(tmp_path, name, overrides, lengths):
    check_parity(tmp_path, [prompt(n, seed=i) for i, n in enumerate(lengths)], overrides)


def test_transformers_4_style_config(tmp_path):
    def to_v4(cfg):
        rope = cfg.pop("rope_parameters")
        cfg.pop("layer_types")
        cfg["rope_theta"] = rope["full_attention"]["rope_theta"]
        cfg["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        cfg["rope_scaling"] = None
        cfg["sliding_window_pattern"] = 2  # layers: sliding, full, sliding, as the oracle's
        return cfg

    check_parity(
        tmp_path,
        [prompt(25)],
        {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
        rewrite_config=to_v4,
    )


def test_save_and_reload_is_bit_identical_without_recompiling(tmp_path, monkeypatch):
    src = tmp_path / "hf"
    tiny_model(src)
    model = RBLNGemma3ForCausalLM.from_pretrained(src, **RBLN)
    ids = prompt(20)[None]
    first = model.generate(ids, max_new_tokens=12)
    model.save_pretrained(tmp_path / "compiled")
    files = sorted(p.name for p in (tmp_path / "compiled").iterdir())
    assert {"config.json", "generation_config.json", "rbln_config.json", "compiled"} <= set(files)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind

    from npu_emulator import device

    def no_tracing(*a, **k):
        raise AssertionError("a kernel was traced again after loading a compiled model")

    monkeypatch.setattr(device.NPU, "_emit", no_tracing)
    again = NPUGemma3ForCausalLM.from_pretrained(tmp_path / "compiled")
    second = again.generate(ids, max_new_tokens=12)
    np.testing.assert_array_equal(first, second)
    assert again.last_report.decode.cycles == model.last_report.decode.cycles


def test_input_kinds_come_back_in_kind_and_reports_are_recorded(tmp_path):
    tiny_model(tmp_path)
    model = NPUGemma3ForCausalLM.from_pretrained(tmp_path, **RBLN)
    p = prompt(10)
    as_list = model.generate([p.tolist()], max_new_tokens=3)
    as_torch = model.generate(torch.from_numpy(p[None]), max_new_tokens=3)
    as_numpy = model.generate(p[None], max_new_tokens=3)
    assert (
        isinstance(as_list, list) and isinstance(as_torch, torch.Tensor) and isinstance(as_numpy, np.ndarray)
    )
    assert as_list == as_torch.tolist() == as_numpy.tolist()
    rep = model.last_report
    assert rep.prompt_tokens == 10 and rep.new_tokens == 2  # the first token comes from prefill
    assert rep.prefill.cycles > 0 and rep.decode.cycles > 0
    assert "prefill" in rep.table() and "decode" in rep.table()


def test_too_long_and_bad_inputs_raise(tmp_path):
    tiny_model(tmp_path)
    model = NPUGemma3ForCausalLM.from_pretrained(tmp_path, **{**RBLN, "rbln_max_seq_len": 64})
    with pytest.raises(ValueError, match=r"prompt of 60 tokens \+ 10 new tokens exceeds max_seq_len 64"):
        model.generate(prompt(60)[None], max_new_tokens=10)
    with pytest.raises(ValueError, match="exceeds the compiled batch_size 1"):
        model.generate(np.stack([prompt(5), prompt(5)]), max_new_tokens=2)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['frobnicate'\]"):
        model.generate(prompt(5)[None], max_new_tokens=2, frobnicate=True)


def test_from_model_compiles_a_transformers_model(tmp_path):
    hf = tiny_model(tmp_path / "hf")
    model = NPUGemma3ForCausalLM.from_model(hf, model_save_dir=tmp_path / "saved", **RBLN)
    ids = prompt(12)[None]
    with torch.no_grad():
        ref = hf.generate(torch.from_numpy(ids), max_new_tokens=6, do_sample=False)
    np.testing.assert_array_equal(model.generate(ids, max_new_tokens=6), ref.numpy())
    assert (tmp_path / "saved" / "rbln_config.json").exists()
    with pytest.raises(TypeError, match="expects a transformers Gemma3ForCausalLM"):
        NPUGemma3ForCausalLM.from_model(object())


def test_tile_mode_generates_the_same_tokens_as_fast_mode(tmp_path):
    tiny_model(tmp_path, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    ids = prompt(12)[None]
    outs, reports = [], []
    for mode in ("fast", "tile"):
        model = NPUGemma3ForCausalLM.from_pretrained(tmp_path, **{**RBLN, "rbln_mode": mode})
        outs.append(model.generate(ids, max_new_tokens=3))
        reports.append(model.last_report)
    np.testing.assert_array_equal(outs[0], outs[1])
    assert reports[0].prefill.cycles == reports[1].prefill.cycles
    assert reports[0].decode.cycles == reports[1].decode.cycles


def test_compiling_names_the_kernel_that_does_not_fit(tmp_path):
    from npu_emulator import TINY

    tiny_model(tmp_path)
    small = TINY.replace(name="small", local_sram_bytes=4096, shared_sram_bytes=4096)
    with pytest.raises(
        ValueError,
        match=r"compiling for 'small': kernel matmul on inputs \(64, 64\), \(64, 128\): .*fits 4096 B of local SRAM",
    ):
        NPUGemma3ForCausalLM.from_pretrained(tmp_path, **{**RBLN, "rbln_npu": small})


def test_a_transformers_text_streamer_works(tmp_path, capsys):
    import json

    from transformers import AutoTokenizer, TextStreamer

    from tests.gemma3.tokenizer_fixture import build_tokenizer

    build_tokenizer(tmp_path)
    vocab = len(json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"]) + 8
    tiny_model(tmp_path, vocab_size=vocab)
    model = NPUGemma3ForCausalLM.from_pretrained(tmp_path, **RBLN)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = hf_tok("The capital of France is", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=6, streamer=TextStreamer(hf_tok, skip_prompt=True))
    printed = capsys.readouterr().out
    assert printed.strip() == hf_tok.decode(out[0, ids.shape[1] :]).strip()


@pytest.mark.parametrize("max_seq_len", [100, 64])  # 100 runs past the 64-token window; 64 stays inside it
def test_any_max_seq_len_and_windows_longer_than_it(tmp_path, max_seq_len):
    check_parity(
        tmp_path, [prompt(40)], {"sliding_window": 64}, new=max_seq_len - 40, rbln_max_seq_len=max_seq_len
    )


def test_without_a_mask_padding_is_inferred_from_the_pad_token_as_transformers_does(tmp_path):
    hf = tiny_model(tmp_path)
    model = NPUGemma3ForCausalLM.from_pretrained(tmp_path, **{**RBLN, "rbln_batch_size": 2})
    ids = np.zeros((2, 20), np.int64)  # pad_token_id 0, left padding
    ids[0] = prompt(20)
    ids[1, 8:] = prompt(12, seed=1)
    ours = model.generate(ids, max_new_tokens=8, eos_token_id=[])
    with torch.no_grad():
        ref = hf.generate(torch.from_numpy(ids), max_new_tokens=8, do_sample=False, eos_token_id=None)
    np.testing.assert_array_equal(ours, ref.numpy())
    # The padded row differs from what attending to its pad tokens gives.
    unmasked = model.generate(ids, attention_mask=np.ones_like(ids), max_new_tokens=8, eos_token_id=[])
    assert not np.array_equal(unmasked[1], ours[1])
    # A pad token that is also an end-of-sequence token is not padding: all ones, as transformers.
    same = model.generate(ids, max_new_tokens=8, eos_token_id=[0], pad_token_id=0)
    np.testing.assert_array_equal(same[:, :20], ids)
    np.testing.assert_array_equal(
        same[1, 20:],
        model.generate(ids[1:], attention_mask=np.ones((1, 20)), max_new_tokens=8, eos_token_id=[0])[0, 20:],
    )
