"""The image+text model against transformers' Gemma3ForConditionalGeneration, on tiny random
models built in code, fed by our Gemma3Processor.

Our greedy tokens must equal transformers' for 16 new tokens, and our logits at every step must
be within 1e-4 (relative to the logit scale) of transformers' for the same sequence (our sequence
fed to transformers in one forward pass). The NPU runs with fp32 numerics: the oracle's.
"""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from gemma3 import (
    Gemma3Processor,
    NPUGemma3ForConditionalGeneration,
    NPUGemma3ForConditionalGenerationConfig,
    RBLNGemma3ForConditionalGeneration,
    RBLNGemma3ForConditionalGenerationConfig,
)
from gemma3.rbln_config import NPUGemma3ForCausalLMConfig, NPUSiglipVisionModelConfig
from gemma3.tokenizer import Gemma3Tokenizer
from tests.gemma3.oracle import tiny_image_model
from tests.gemma3.tokenizer_fixture import build_tokenizer

torch = pytest.importorskip("torch", reason="the oracle extra is not installed")

NEW = 16
TOL = 1e-4
BOI, EOI, SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
RBLN = dict(
    rbln_npu="tiny",
    rbln_numerics="fp32",
    rbln_language_model={"prefill_chunk_size": 64, "max_seq_len": 256},
)
TWO_LAYERS = {"num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"]}
# words the fixture tokenizer never saw: over 64 tokens (a prefill chunk), many sliding windows
LONG_TEXT = (
    "Quietly, seven lazy zebras jog over a bumpy quartz ridge while foxes watch: why? Because 2024 was odd."
)
# name -> (vision config, mm_tokens_per_image, text config, texts, images per text)
CASES = {
    # 4 x 4 patches pooled 2 x 2 into 4 tokens; one image with text on both sides
    "one-image-mm4": (
        dict(image_size=32, patch_size=8),
        4,
        dict(sliding_window=8, **TWO_LAYERS),
        [f"Describe {BOI} in a few words."],
        [1],
    ),
    # 4 x 4 patches of 7 pixels, no pooling: 16 tokens an image; two images, text between and after
    "two-images-mm16": (
        dict(image_size=28, patch_size=7, hidden_size=48, num_attention_heads=3),
        16,
        dict(sliding_window=16, **TWO_LAYERS),
        [f"The capital of France is {BOI} and {BOI} Hello world! How are you today?"],
        [2],
    ),
    # 6 x 6 patches pooled 3 x 3: the image comes after more than a prefill chunk (64) and many
    # sliding windows (8) of text, so its queries read a ring cache; text follows it
    "image-after-long-text": (
        dict(image_size=48, patch_size=8, hidden_size=64, num_attention_heads=2, intermediate_size=80),
        4,
        dict(
            sliding_window=8,
            num_hidden_layers=3,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
        [f"{LONG_TEXT} {BOI} What is it?"],
        [1],
    ),
    # a left-padded batch of two prompts, one and two images
    "batch-of-two": (
        dict(image_size=32, patch_size=8),
        4,
        dict(sliding_window=8, **TWO_LAYERS),
        [f"One {BOI} here.", f"Two {BOI} and {BOI} there, please."],
        [1, 2],
    ),
}


def add_image_tokens(directory):
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (EOI, SOFT)])
    tok.save(str(directory / "tokenizer.json"))
    cfg = json.loads((directory / "tokenizer_config.json").read_text())
    cfg.update(boi_token=BOI, eoi_token=EOI, image_token=SOFT)
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = build_tokenizer(tmp_path_factory.mktemp("tok"))
    add_image_tokens(d)
    return d


def build(directory, tok_dir, vision, tokens, text, seed=0, oov=False):
    """A tiny image+text model in ``directory`` with our tokenizer; the image token id is the
    tokenizer's <image_soft_token>, inside the text vocabulary or (``oov``) just past it."""
    shutil.copytree(tok_dir, directory, dirs_exist_ok=True)
    tok = Gemma3Tokenizer(directory)
    ids = {t: tok.encode(t, add_special_tokens=False)[0] for t in (BOI, EOI, SOFT)}
    vocab = ids[SOFT] if oov else ids[SOFT] + 8
    return tiny_image_model(
        directory,
        seed=seed,
        vision=vision,
        text={"vocab_size": vocab, **text},
        mm_tokens_per_image=tokens,
        boi_token_index=ids[BOI],
        eoi_token_index=ids[EOI],
        image_token_index=ids[SOFT],
    )


def images(counts, seed=0):
    rng = np.random.default_rng(seed)
    return [
        [rng.integers(0, 256, (20 + 7 * i, 30 + 5 * j, 3), dtype=np.uint8) for j in range(n)]
        for i, n in enumerate(counts)
    ]


def oracle_logits(hf, inputs, sequences, new=NEW):
    """transformers' logits at the last prompt position and each of ``new`` generated ones, for our
    sequence: (B, new, V)."""
    seq = torch.from_numpy(np.asarray(sequences))
    width = inputs["input_ids"].shape[1]
    mask = torch.ones_like(seq)
    mask[:, :width] = torch.from_numpy(inputs["attention_mask"])
    types = torch.zeros_like(seq)
    types[:, :width] = torch.from_numpy(inputs["token_type_ids"])
    with torch.no_grad():
        logits = hf(
            input_ids=seq,
            pixel_values=torch.from_numpy(inputs["pixel_values"]),
            attention_mask=mask,
            token_type_ids=types,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        ).logits.numpy()
    return logits[:, width - 1 : width - 1 + new]


def check_parity(model, hf, inputs):
    out = model.generate(
        **inputs, max_new_tokens=NEW, eos_token_id=[], return_dict_in_generate=True, output_logits=True
    )
    pt = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        ref = hf.generate(**pt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    np.testing.assert_array_equal(out.sequences, ref.numpy())
    theirs = oracle_logits(hf, inputs, out.sequences)
    for i, ours in enumerate(out.logits):
        scale = np.abs(theirs[:, i]).max()
        err = np.abs(ours - theirs[:, i]).max() / scale
        assert err <= TOL, f"step {i}: {err:.2e}"
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory, tok_dir):
    """The "one-image-mm4" model, compiled once for the tests that only use it."""
    directory = tmp_path_factory.mktemp("small")
    vision, tokens, text, _, _ = CASES["one-image-mm4"]
    hf = build(directory, tok_dir, vision, tokens, text)
    model = NPUGemma3ForConditionalGeneration.from_pretrained(directory, **RBLN)
    return directory, hf, model, Gemma3Processor.from_pretrained(directory)


def small_inputs(processor, text=f"Describe {BOI} in a few words.", counts=(1,), seed=0):
    return processor(images=images(counts, seed), text=text, return_tensors="np")


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", [n for n in CASES if n != "one-image-mm4"])
def test_greedy_tokens_and_logits_match_transformers(tmp_path, tok_dir, name):
    vision, tokens, text, texts, counts = CASES[name]
    hf = build(tmp_path, tok_dir, vision, tokens, text, oov=name == "two-images-mm16")
    processor = Gemma3Processor.from_pretrained(tmp_path)
    inputs = processor(images=images(counts), text=texts, return_tensors="np")
    model = NPUGemma3ForConditionalGeneration.from_pretrained(tmp_path, **RBLN, rbln_batch_size=len(texts))
    check_parity(model, hf, inputs)
    rep = model.last_report
    assert rep.images == sum(counts) and rep.image_tokens == sum(counts) * tokens
    if name == "image-after-long-text":
        assert inputs["input_ids"][0].tolist().index(processor.image_token_id) > 64


def test_one_image_matches_transformers_and_depends_on_the_bidirectional_mask(small):
    directory, hf, model, processor = small
    inputs = small_inputs(processor)
    out = check_parity(model, hf, inputs)
    # transformers without token_type_ids keeps image tokens causal: clearly other logits, so
    # the parity above checks the bidirectional image attention
    seq = torch.from_numpy(out.sequences)
    with torch.no_grad():
        causal = hf(input_ids=seq, pixel_values=torch.from_numpy(inputs["pixel_values"])).logits.numpy()
    width = inputs["input_ids"].shape[1]
    ours = np.stack(out.logits, axis=1)
    theirs = causal[:, width - 1 : width - 1 + NEW]
    assert np.abs(ours - theirs).max() > 100 * TOL * np.abs(theirs).max()


def test_a_prompt_ending_in_an_image_and_tensors_of_any_kind(small):
    """Hand-made ids whose last tokens are an image's (logits from the image chunk); torch
    inputs come back as torch, without token_type_ids the image tokens are found by id."""
    directory, hf, model, processor = small
    text_ids = processor.tokenizer.encode("The capital of France is")
    ids = np.array([text_ids + [processor.boi_token_id] + [processor.image_token_id] * 4])
    pixels = small_inputs(processor)["pixel_values"]
    types = (ids == processor.image_token_id).astype(np.int64)
    out = model.generate(torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels), max_new_tokens=NEW)
    assert isinstance(out, torch.Tensor)
    with torch.no_grad():
        ref = hf.generate(
            input_ids=torch.from_numpy(ids),
            pixel_values=torch.from_numpy(pixels),
            token_type_ids=torch.from_numpy(types),
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
        )
    np.testing.assert_array_equal(out.numpy(), ref.numpy())
    rep = model.last_report
    assert rep.prefill is not None and rep.image_prefill is not None


# ----------------------------------------------------------------------------- cost report


def test_the_report_has_four_phases(small):
    directory, hf, model, processor = small
    inputs = small_inputs(processor, text=f"One {BOI} and two {BOI}", counts=(2,))
    model.generate(**inputs, max_new_tokens=4, eos_token_id=[])
    rep = model.last_report
    names = [name for name, *_ in rep.phases()]
    assert names == ["image encoding", "image prefill", "text prefill", "decode"]
    assert rep.image_encoding.cycles > 0 and rep.image_prefill.cycles > 0
    assert rep.text_prefill.cycles > 0 and rep.decode.cycles > 0
    assert rep.images == 2 and rep.image_tokens == 8 and rep.new_tokens == 3
    assert rep.image_tokens + rep.text_tokens == rep.prompt_tokens == inputs["attention_mask"].sum()
    table = rep.table()
    for name in names:
        assert name in table
    kernels = model.kernel_reports()
    assert sum(r.cycles for r in kernels) == sum(r.cycles for _, r, *_ in rep.phases())
    # a text-only prompt: no image phases
    model.generate(processor(text="Hello world!", return_tensors="np")["input_ids"], max_new_tokens=2)
    assert model.last_report.image_encoding is None and model.last_report.image_prefill is None
    assert model.last_report.images == 0


# ----------------------------------------------------------------------------- save / load


def test_save_and_reload_is_bit_identical_without_tracing(small, tmp_path, monkeypatch):
    directory, hf, model, processor = small
    inputs = small_inputs(processor, seed=3)
    first = model.generate(**inputs, max_new_tokens=8)
    model.save_pretrained(tmp_path / "compiled")
    files = {p.name for p in (tmp_path / "compiled").iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "rbln_config.json",
        "compiled",
        "tokenizer.json",
    } <= files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    saved = json.loads((tmp_path / "compiled" / "rbln_config.json").read_text())
    assert saved["cls_name"] == "RBLNGemma3ForConditionalGenerationConfig"
    assert saved["language_model"]["cls_name"] == "RBLNGemma3ForCausalLMConfig"
    assert saved["language_model"]["image_prefill_chunk_size"] == 4

    from npu_emulator import device

    def no_tracing(*a, **k):
        raise AssertionError("a kernel was traced again after loading a compiled model")

    monkeypatch.setattr(device.NPU, "_emit", no_tracing)
    again = RBLNGemma3ForConditionalGeneration.from_pretrained(tmp_path / "compiled")
    # the saved directory serves its processor too
    inputs_again = small_inputs(Gemma3Processor.from_pretrained(tmp_path / "compiled"), seed=3)
    second = again.generate(**inputs_again, max_new_tokens=8)
    np.testing.assert_array_equal(first, second)
    for name, rep, *_ in again.last_report.phases():
        assert rep.cycles == getattr(model.last_report, name.replace(" ", "_")).cycles
    with pytest.raises(ValueError, match=r"compiled with other \['language_model.max_seq_len'\]"):
        NPUGemma3ForConditionalGeneration.from_pretrained(
            tmp_path / "compiled", rbln_language_model={"max_seq_len": 128}
        )


def test_from_model_compiles_a_transformers_model(small, tmp_path):
    directory, hf, model, processor = small
    compiled = NPUGemma3ForConditionalGeneration.from_model(hf, model_save_dir=tmp_path / "saved", **RBLN)
    inputs = small_inputs(processor, seed=5)
    np.testing.assert_array_equal(
        compiled.generate(**inputs, max_new_tokens=4), model.generate(**inputs, max_new_tokens=4)
    )
    assert (tmp_path / "saved" / "rbln_config.json").exists()
    with pytest.raises(TypeError, match="expects a transformers Gemma3ForConditionalGeneration"):
        NPUGemma3ForConditionalGeneration.from_model(hf.model.language_model)


# ----------------------------------------------------------------------------- bad input


def test_image_count_and_token_mismatches_raise(small):
    directory, hf, model, processor = small
    one = small_inputs(processor)
    two = small_inputs(processor, text=f"a {BOI} b {BOI}", counts=(2,))
    ids, types = one["input_ids"], one["token_type_ids"]
    with pytest.raises(
        ValueError, match=r"image count mismatch: pixel_values holds 2 image\(s\) but the prompts hold 1"
    ):
        model.generate(ids, pixel_values=two["pixel_values"], max_new_tokens=2)
    with pytest.raises(
        ValueError, match=r"image count mismatch: the prompts hold 1 image\(s\) .* no pixel_values"
    ):
        model.generate(ids, max_new_tokens=2)
    with pytest.raises(
        ValueError, match=r"image count mismatch: pixel_values holds 1 image\(s\) but the prompts hold 0"
    ):
        model.generate(
            processor(text="Hello")["input_ids"], pixel_values=one["pixel_values"], max_new_tokens=2
        )
    with pytest.raises(ValueError, match=r"pixel_values \(1, 3, 16, 16\) must be \(images, 3, 32, 32\)"):
        model.generate(ids, pixel_values=np.zeros((1, 3, 16, 16), np.float32), max_new_tokens=2)
    cut = ids[:, : ids[0].tolist().index(processor.image_token_id) + 2]  # half an image
    with pytest.raises(ValueError, match="a run of 2 image tokens .* each image is 4 of them"):
        model.generate(cut, pixel_values=one["pixel_values"], max_new_tokens=2)
    with pytest.raises(ValueError, match="token_type_ids disagree with input_ids at sequence 0"):
        model.generate(ids, pixel_values=one["pixel_values"], token_type_ids=1 - types, max_new_tokens=2)
    bad = ids.copy()
    bad[0, 1] = 10_000
    with pytest.raises(ValueError, match=r"input_ids\[0, 1\] = 10000 is outside the vocabulary"):
        model.generate(bad, pixel_values=one["pixel_values"], max_new_tokens=2)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['frobnicate'\]"):
        model.generate(**one, max_new_tokens=2, frobnicate=True)


C = NPUGemma3ForConditionalGenerationConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        (
            {"batch_size": 2, "language_model": {"batch_size": 3}},
            "batch_size 2 and language_model.batch_size 3 differ",
        ),
        ({"vision_tower": {"batch_size": 2}}, "vision_tower: batch_size must be 1 for the vision tower"),
        ({"vision_tower": {"image_size": 0}}, "vision_tower: image_size must be a positive integer, got 0"),
        (
            {"language_model": {"prefill_chunk_size": 100}},
            "language_model: prefill_chunk_size must be divisible by 64",
        ),
        ({"language_model": {"max_seq_len": -1}}, "language_model: max_seq_len must be a positive integer"),
        (
            {"language_model": {"warp": 1}},
            r"language_model: Unexpected arguments: \[.warp.\] \(NPUGemma3ForCausalLMConfig",
        ),
        ({"language_model": 7}, "language_model must be a dict or NPUGemma3ForCausalLMConfig, got int"),
        (
            {"vision_tower": NPUGemma3ForCausalLMConfig()},
            "vision_tower must be a dict or NPUSiglipVisionModelConfig",
        ),
        (
            {"npu": "atom", "language_model": {"npu": "tiny"}},
            "language_model.npu 'tiny' differs from the model's npu 'atom'",
        ),
        ({"numerics": "fp16"}, "numerics must be 'bf16' or 'fp32', got 'fp16'"),
        ({"frobnicate": 1}, r"Unexpected arguments: \[.frobnicate.\]"),
    ],
)
def test_bad_configs_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        C.create(kwargs)


def test_config_defaults_sub_configs_and_save_load(tmp_path):
    assert C is RBLNGemma3ForConditionalGenerationConfig
    c = C(2, {"image_size": 32}, NPUGemma3ForCausalLMConfig(max_seq_len=128), npu="tiny")
    assert c.batch_size == c.language_model.batch_size == 2 and c.vision_tower.batch_size == 1
    assert isinstance(c.vision_tower, NPUSiglipVisionModelConfig)
    assert c.language_model.npu == c.vision_tower.npu == "tiny"
    up = C(language_model={"npu": "tiny", "numerics": "fp32"})  # a sub-config's chip fields go up
    assert (up.npu, up.numerics, up.vision_tower.numerics) == ("tiny", "fp32", "fp32")
    c.save(tmp_path)
    back = C.load(tmp_path, rbln_numerics="fp32", rbln_language_model={"prefill_chunk_size": 128})
    assert back.numerics == back.language_model.numerics == "fp32"
    assert back.language_model.max_seq_len == 128 and back.language_model.prefill_chunk_size == 128
    assert back.vision_tower.image_size == 32 and back.batch_size == 2


def test_model_level_checks(tmp_path, small):
    directory, hf, model, processor = small
    with pytest.raises(ValueError, match="image_prefill_chunk_size 8 must equal mm_tokens_per_image 4"):
        NPUGemma3ForConditionalGeneration.from_pretrained(
            directory, **{**RBLN, "rbln_language_model": {"image_prefill_chunk_size": 8}}
        )
    with pytest.raises(ValueError, match="vision_tower.image_size 64 must equal vision_config.image_size 32"):
        NPUGemma3ForConditionalGeneration.from_pretrained(
            directory, **RBLN, rbln_vision_tower={"image_size": 64}
        )
    from tests.gemma3.oracle import tiny_model

    tiny_model(tmp_path / "text")
    with pytest.raises(ValueError, match="not an image\\+text Gemma3 config"):
        NPUGemma3ForConditionalGeneration.from_pretrained(tmp_path / "text", **RBLN)


# ----------------------------------------------------------------------------- command line


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "gemma3", *args], capture_output=True, text=True, timeout=600
    )


def test_cli_generates_with_images_and_prints_four_phases(small, tmp_path):
    from PIL import Image

    directory = small[0]
    paths = []
    for i, image in enumerate(images([2], seed=7)[0]):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(image).save(paths[-1])
    trace = tmp_path / "run.json"
    common = ["generate", "--model", str(directory), "--max-new-tokens", "4", "--npu", "tiny"]
    out = run(
        *common, "--image", paths[0], "--image", paths[1], "--prompt", "Compare them.", "--trace", str(trace)
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{BOI} {BOI} Compare them.")
    for part in ("image encoding", "image prefill", "text prefill", "decode", "emulated cycles"):
        assert part in out.stdout
    assert json.loads(trace.read_text())["traceEvents"]
    chat = run(*common, "--image", paths[0], "--prompt", "What is this?", "--chat")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.startswith("What is this?\n") and "image prefill" in chat.stdout
    bad = run(*common, "--image", paths[0], "--prompt", f"a {BOI} b {BOI}")
    assert bad.returncode == 1 and "2 <start_of_image> marker(s) but 1 image(s)" in bad.stderr
    missing = run(*common, "--image", str(tmp_path / "nope.png"), "--prompt", "hi")
    assert missing.returncode == 1 and "nope.png: no such file" in missing.stderr
