"""Code written for Optimum RBLN's Gemma3 classes, with only its import changed, on tiny random
models: the model-zoo flows (compile, save, reload with the Auto class, transformers'
AutoTokenizer / AutoProcessor feeding ``generate(**inputs)``, greedy tokens equal to
transformers'), forward, the transformers-shaped objects, from_pretrained's hub arguments, and
what each rbln_config field does to a model. The NPU runs with fp32 numerics: the oracle's."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gemma3 import (  # the one changed line of a model-zoo script: `from optimum.rbln import ...`
    RBLNAutoModelForCausalLM,
    RBLNAutoModelForImageTextToText,
    RBLNGemma3ForCausalLM,
    RBLNGemma3ForConditionalGeneration,
)
from gemma3.tokenizer import GEMMA3_CHAT_TEMPLATE, Gemma3Tokenizer
from tests.gemma3.oracle import tiny_image_model, tiny_model
from tests.gemma3.test_processor import BOI, EOI, SOFT, add_image_tokens
from tests.gemma3.tokenizer_fixture import build_tokenizer

torch = pytest.importorskip("torch", reason="the oracle extra is not installed")
transformers = pytest.importorskip("transformers", reason="the oracle extra is not installed")

NEW = 12
TOL = 1e-4
CHIP = dict(rbln_npu="tiny", rbln_numerics="fp32")
TEXT = dict(prefill_chunk_size=64, max_seq_len=256)
PROMPTS = ["The capital of France is", "Hello world! How are you today? Numbers 12345"]


def text_checkpoint(directory):
    """A tiny random Gemma3ForCausalLM with the fixture tokenizer (its vocabulary) beside it."""
    directory.mkdir()
    build_tokenizer(directory)
    vocab = transformers.AutoTokenizer.from_pretrained(directory).vocab_size
    return tiny_model(directory, vocab_size=vocab + 8)


def greedy(hf, inputs, new=NEW):
    with torch.no_grad():
        return hf.generate(**inputs, max_new_tokens=new, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """The zoo's compile script on a tiny text model: compiled once, saved, loaded back by the
    Auto class with export=False (the inference script)."""
    root = tmp_path_factory.mktemp("text")
    hf = text_checkpoint(root / "ckpt")
    # The zoo compiles Gemma 3 4B with tensor_parallel_size=8 (test_zoo_tensor_parallel_flow).
    compiled = RBLNGemma3ForCausalLM.from_pretrained(
        str(root / "ckpt"),
        export=True,
        rbln_config={"tensor_parallel_size": 1, "batch_size": 2, **TEXT},
        **CHIP,
    )
    compiled.save_pretrained(root / "compiled")
    model = RBLNAutoModelForCausalLM.from_pretrained(str(root / "compiled"), export=False)
    return root, hf, model


def test_zoo_text_flow_matches_transformers(text):
    root, hf, model = text
    assert isinstance(model, RBLNGemma3ForCausalLM)
    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "compiled")
    tokenizer.padding_side = "left"
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    out = model.generate(**inputs, max_new_tokens=NEW)
    ref = greedy(hf, inputs)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_array_equal(out.numpy(), ref.numpy())
    assert tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_zoo_tensor_parallel_flow(text, tmp_path):
    """The zoo's Gemma 3 4B script sets tensor_parallel_size=8 (its 8 heads); this model has 4."""
    root, hf = text[0], text[1]
    compiled = RBLNGemma3ForCausalLM.from_pretrained(
        str(root / "ckpt"), export=True, rbln_config={"tensor_parallel_size": 4, **TEXT}, **CHIP
    )
    compiled.save_pretrained(tmp_path / "tp4")
    model = RBLNAutoModelForCausalLM.from_pretrained(str(tmp_path / "tp4"), export=False)
    assert model.runtime.group.num_devices == 4  # compiled for four devices, loaded on four
    ids = torch.tensor([[2, 40, 41, 42, 43]])
    np.testing.assert_array_equal(
        model.generate(ids, max_new_tokens=6).numpy(), greedy(hf, {"input_ids": ids}, 6).numpy()
    )


def test_what_cannot_be_compiled_is_refused_naming_it(text):
    root = text[0]
    with pytest.raises(ValueError, match=r"tensor_parallel_size 8 exceeds num_attention_heads 4"):
        RBLNGemma3ForCausalLM.from_pretrained(root / "ckpt", rbln_tensor_parallel_size=8, **CHIP)
    with pytest.raises(ValueError, match=r"adapters list cannot be empty"):  # LoRA: tests/gemma3/test_lora.py
        RBLNGemma3ForCausalLM.from_pretrained(root / "ckpt", rbln_lora_config={"adapters": []}, **CHIP)
    with pytest.raises(
        NotImplementedError, match=r"quantization weights=int4 .*quantized formats are not emulated"
    ):
        RBLNGemma3ForCausalLM.from_pretrained(root / "ckpt", rbln_quantization={"precision": "w4a16"}, **CHIP)


def test_model_level_checks_of_cache_fields(text):
    root = text[0]
    ckpt = root / "ckpt"
    with pytest.raises(ValueError, match="sliding_window 16 differs from config.json's sliding_window 8"):
        RBLNGemma3ForCausalLM.from_pretrained(ckpt, rbln_sliding_window=16, **CHIP)
    with pytest.raises(
        ValueError, match=r"sliding_window_layers \[1\] differ from the sliding layers .* \[0, 2\]"
    ):
        RBLNGemma3ForCausalLM.from_pretrained(ckpt, rbln_sliding_window_layers=[1], **CHIP)
    with pytest.raises(
        ValueError, match=r"kvcache_num_blocks 1 holds fewer than the 2 blocks of 256 positions"
    ):
        RBLNGemma3ForCausalLM.from_pretrained(
            ckpt, rbln_kvcache_num_blocks=1, rbln_batch_size=2, rbln_max_seq_len=256, **CHIP
        )


def test_forward_returns_last_token_logits_as_transformers(text):
    root, hf, model = text
    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "compiled")
    tokenizer.padding_side = "left"
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    out = model(**inputs)
    assert out.logits.shape == (2, 1, hf.config.vocab_size) and isinstance(out.logits, torch.Tensor)
    assert list(out.keys()) == ["logits"] and out[0] is out.logits and out.to_tuple() == (out.logits,)
    position_ids = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(**inputs, position_ids=position_ids).logits[:, -1:]
    err = (out.logits - ref).abs().max() / ref.abs().max()
    assert err <= TOL
    again = model(inputs["input_ids"], attention_mask=inputs["attention_mask"], position_ids=position_ids)
    assert torch.equal(again.logits, out.logits)
    with pytest.raises(
        NotImplementedError, match=r"position_ids\[0, 3\] = 7: only the real tokens' own positions"
    ):
        bad = position_ids.clone()
        bad[0, 3] = 7
        model(**inputs, position_ids=bad)
    with pytest.raises(TypeError, match=r"forward: unexpected keyword argument\(s\) \['labels'\]"):
        model(**inputs, labels=inputs["input_ids"])


def test_transformers_shaped_objects(text):
    root, hf, model = text
    assert isinstance(model.config, transformers.Gemma3TextConfig)
    assert model.config.model_type == "gemma3_text" and model.config.vocab_size == hf.config.vocab_size
    assert isinstance(model.generation_config, transformers.GenerationConfig)
    assert model.generation_config.eos_token_id == 1
    assert model.can_generate() and str(model.device) == "cpu"
    assert model.model_save_dir == str(root / "compiled")
    assert list(model.compiled_models) == ["prefill", "decoder_batch_2"]
    ids = np.array([[2, 40, 41, 42]])
    out = model.generate(ids, max_new_tokens=3, return_dict_in_generate=True, output_logits=True)
    assert list(out.keys()) == ["sequences", "logits"] and out[0] is out.sequences and out[1] is out.logits
    assert out.to_tuple() == (out.sequences, out.logits) and out["sequences"] is out.sequences
    with pytest.raises(KeyError):
        out["scores"]  # not returned: not a key, as in transformers


def test_generation_config_edits_take_effect_and_are_saved(text, tmp_path):
    root, hf, model = text
    ids = np.array([[2, 40, 41, 42]])
    model.generation_config.max_new_tokens = 2
    try:
        assert model.generate(ids).shape == (1, 6)
        model.save_pretrained(tmp_path / "again")
    finally:
        model.generation_config.max_new_tokens = None
    saved = json.loads((tmp_path / "again" / "generation_config.json").read_text())
    assert saved["max_new_tokens"] == 2 and saved["eos_token_id"] == 1


def test_hub_arguments_and_the_local_cache(text, tmp_path):
    root = text[0]
    # a hub id resolved from a Hugging Face cache laid out as huggingface_hub lays it out
    repo = tmp_path / "hub" / "models--tiny-org--gemma3-tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    shutil.copytree(root / "compiled", snapshot / "sub")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    model = RBLNGemma3ForCausalLM.from_pretrained(
        "tiny-org/gemma3-tiny",
        subfolder="sub",
        cache_dir=tmp_path / "hub",
        revision="main",
        torch_dtype=torch.float32,
        trust_remote_code=True,
    )
    ids = np.array([[2, 40, 41, 42]])
    np.testing.assert_array_equal(
        model.generate(ids, max_new_tokens=4), text[2].generate(ids, max_new_tokens=4)
    )
    with pytest.raises(
        FileNotFoundError,
        match=r"'tiny-org/absent' is not a local directory and is not in the Hugging Face cache at .*hub",
    ):
        RBLNGemma3ForCausalLM.from_pretrained("tiny-org/absent", cache_dir=tmp_path / "hub")
    with pytest.raises(FileNotFoundError, match=r"subfolder 'nope' of .*: no directory"):
        RBLNGemma3ForCausalLM.from_pretrained(root / "compiled", subfolder="nope")
    with pytest.raises(ValueError, match=r"revision 'v1' applies to a hub id, not to the local directory"):
        RBLNGemma3ForCausalLM.from_pretrained(root / "compiled", revision="v1")
    with pytest.raises(ValueError, match=r"dtype 'int8': expected 'auto', float32, bfloat16 or float16"):
        RBLNGemma3ForCausalLM.from_pretrained(root / "compiled", dtype="int8")
    with pytest.raises(TypeError, match=r"from_pretrained: unexpected keyword argument\(s\) \['use_flash'\]"):
        RBLNGemma3ForCausalLM.from_pretrained(root / "compiled", use_flash=True)


def test_save_pretrained_push_to_hub(text, tmp_path):
    model = text[2]
    model.save_pretrained(tmp_path / "a", push_to_hub=False)
    assert (tmp_path / "a" / "rbln_config.json").exists()
    with pytest.raises(NotImplementedError, match=r"push_to_hub=True\): no hub access here"):
        model.save_pretrained(tmp_path / "b", push_to_hub=True)
    assert not (tmp_path / "b").exists()


def test_compiled_load_keeps_compiled_fields_and_takes_runtime_ones(text):
    root = text[0]
    model = RBLNAutoModelForCausalLM.from_pretrained(
        root / "compiled", rbln_create_runtimes=False, rbln_device=0, rbln_timeout=120
    )
    assert (model.rbln_config.create_runtimes, model.rbln_config.device, model.rbln_config.timeout) == (
        False,
        0,
        120,
    )
    assert model.rbln_config.max_seq_len == 256 and model.rbln_config.batch_size == 2
    with pytest.raises(ValueError, match=r"was compiled with other \['max_seq_len'\]"):
        RBLNAutoModelForCausalLM.from_pretrained(root / "compiled", rbln_config={"max_seq_len": 128})
    with pytest.raises(
        ValueError, match=r"was compiled with other \['decoder_batch_sizes', 'use_inputs_embeds'\]"
    ):
        RBLNAutoModelForCausalLM.from_pretrained(
            root / "compiled", rbln_decoder_batch_sizes=[1], rbln_use_inputs_embeds=True
        )
    with pytest.raises(
        ValueError, match=r"ckpt/config.json has model_type 'gemma3_text'; .* makes \['gemma3'\]"
    ):
        RBLNAutoModelForImageTextToText.from_pretrained(root / "ckpt", **CHIP)
    with pytest.raises(
        ValueError, match=r"rbln_config.json names RBLNGemma3ForCausalLMConfig, which .* does not make"
    ):
        RBLNAutoModelForImageTextToText.from_pretrained(root / "compiled")


@pytest.fixture(scope="module")
def variants(text):
    """The tiny text model compiled with use_inputs_embeds and output_hidden_states, and with
    the prefill phase only."""
    ckpt = text[0] / "ckpt"
    both = RBLNGemma3ForCausalLM.from_pretrained(
        ckpt, rbln_config={**TEXT, "use_inputs_embeds": True, "output_hidden_states": True}, **CHIP
    )
    prefill_only = RBLNGemma3ForCausalLM.from_pretrained(
        ckpt, rbln_config={**TEXT, "phases": ["prefill"]}, **CHIP
    )
    return both, prefill_only


def test_inputs_embeds_generate_and_forward(text, variants):
    _, hf, plain = text
    model = variants[0]
    ids = torch.tensor([[2, 40, 41, 42, 43]])
    embeds = hf.get_input_embeddings()(ids).detach()  # Gemma3 scales inside its embedding
    out = model.generate(inputs_embeds=embeds, max_new_tokens=6)
    assert out.shape == (1, 6)  # transformers: from inputs_embeds alone, only the new tokens
    np.testing.assert_array_equal(out.numpy(), model.generate(ids, max_new_tokens=6)[:, 5:].numpy())
    np.testing.assert_array_equal(
        model.generate(ids, inputs_embeds=embeds, max_new_tokens=6).numpy(),
        greedy(hf, {"input_ids": ids}, 6).numpy(),
    )
    assert torch.allclose(model(inputs_embeds=embeds).logits, model(ids).logits, rtol=0, atol=1e-5)
    with pytest.raises(
        ValueError,
        match=r"compiled without use_inputs_embeds; compile with rbln_config=\{'use_inputs_embeds': True\}",
    ):
        plain.generate(inputs_embeds=embeds, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"inputs_embeds \(1, 5, 7\) must be \(batch, tokens, 64\)"):
        model.generate(inputs_embeds=torch.zeros(1, 5, 7), max_new_tokens=2)


def test_output_hidden_states_as_transformers(text, variants):
    hf, model = text[1], variants[0]
    ids = torch.tensor([[0, 0, 2, 40, 41, 42, 43]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    out = model(ids, attention_mask=mask)
    assert (
        list(out.keys()) == ["logits", "hidden_states"]
        and len(out.hidden_states) == hf.config.num_hidden_layers + 1
    )
    with torch.no_grad():
        ref = hf(ids[:, 2:], output_hidden_states=True).hidden_states
    for i, (ours, theirs) in enumerate(zip(out.hidden_states[:-1], ref[:-1])):
        assert (ours[0, :2] == 0).all()  # the padding rows
        err = (ours[:, 2:] - theirs).abs().max() / theirs.abs().max()
        assert err <= TOL, f"layer {i}: {err:.2e}"
    # transformers' last entry is after the final norm; ours is the last layer's output (its input)
    assert out.hidden_states[-1].shape == (1, 7, hf.config.hidden_size)


def test_phases_without_decode_cannot_generate(text, variants):
    model = variants[1]
    assert not model.can_generate() and list(model.compiled_models) == ["prefill"]
    assert model(np.array([[2, 40, 41]])).logits.shape == (1, 1, text[1].config.vocab_size)
    with pytest.raises(ValueError, match=r"compiled without the decode phase \(phases=\['prefill'\]\)"):
        model.generate(np.array([[2, 40, 41]]), max_new_tokens=2)


def test_without_transformers_everything_still_works(text):
    """A fresh interpreter where transformers (and torch) cannot be imported: load the
    compiled model, generate, forward; config and generation_config are views with the same
    attribute names; the tokens are those of this process."""
    root, _, model = text
    ids = [[2, 40, 41, 42]]
    want = model.generate(np.array(ids), max_new_tokens=5).tolist()
    script = textwrap.dedent(
        f"""
        import importlib.abc, json, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("transformers", "torch"):
                    raise ModuleNotFoundError(f"No module named {{name!r}} (hidden by the test)")

        sys.meta_path.insert(0, Block())
        import numpy as np
        from gemma3 import RBLNAutoModelForCausalLM

        model = RBLNAutoModelForCausalLM.from_pretrained({str(root / "compiled")!r}, export=False)
        out = model.generate(np.array({ids}), max_new_tokens=5)
        logits = model(np.array({ids})).logits
        assert "transformers" not in sys.modules and "torch" not in sys.modules
        print(json.dumps(dict(
            tokens=out.tolist(),
            logits_shape=list(logits.shape),
            model_type=model.config.model_type,
            vocab=model.config.vocab_size,
            eos=model.generation_config.eos_token_id,
            device=str(model.device),
        )))
        """
    )
    root_of_repo = (
        pathlib.Path(__file__).resolve().parents[2]
    )  # this checkout's packages, not an installed one
    env = {**os.environ, "PYTHONPATH": str(root_of_repo)}
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env, cwd=root_of_repo
    )
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    vocab = text[1].config.vocab_size
    assert got == dict(
        tokens=want, logits_shape=[1, 1, vocab], model_type="gemma3_text", vocab=vocab, eos=1, device="cpu"
    )


# ----------------------------------------------------------------------------- image + text


@pytest.fixture(scope="module")
def image_ckpt(tmp_path_factory):
    """A tiny random Gemma3ForConditionalGeneration with transformers' own processor saved
    beside it (the files AutoProcessor reads)."""
    directory = tmp_path_factory.mktemp("image")
    add_image_tokens(build_tokenizer(directory))
    tok = Gemma3Tokenizer(directory)
    ids = {t: tok.encode(t, add_special_tokens=False)[0] for t in (BOI, EOI, SOFT)}
    hf = tiny_image_model(
        directory,
        vision=dict(image_size=32, patch_size=8),
        text={
            "vocab_size": ids[SOFT] + 8,
            "num_hidden_layers": 2,
            "layer_types": ["sliding_attention", "full_attention"],
            "sliding_window": 8,
        },
        mm_tokens_per_image=4,
        boi_token_index=ids[BOI],
        eoi_token_index=ids[EOI],
        image_token_index=ids[SOFT],
    )
    transformers.Gemma3Processor(
        image_processor=transformers.Gemma3ImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=transformers.AutoTokenizer.from_pretrained(directory),
        image_seq_length=4,
        chat_template=GEMMA3_CHAT_TEMPLATE,
    ).save_pretrained(directory)
    return directory, hf


def chat_inputs(processor, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (40 + 9 * i, 30, 3), dtype=np.uint8)) for i in range(2)]
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": images[0]},
                {"type": "image", "image": images[1]},
                {"type": "text", "text": "Compare the two images."},
            ],
        }
    ]
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def test_zoo_image_text_flow_matches_transformers(image_ckpt, tmp_path):
    directory, hf = image_ckpt
    # The gemma-3-4b compile script, with two changes the tiny model needs: tensor_parallel_size
    # 8 is issue 13's (1 here), and kvcache_partition_len 16384 needs max_seq_len >= 32768
    # positions (the tiny model has 512).
    model = RBLNGemma3ForConditionalGeneration.from_pretrained(
        str(directory),
        export=True,
        rbln_config={"language_model": {"tensor_parallel_size": 1, "use_inputs_embeds": True, **TEXT}},
        **CHIP,
    )
    model.save_pretrained(tmp_path / "compiled")
    # the inference script
    model = RBLNAutoModelForImageTextToText.from_pretrained(str(tmp_path / "compiled"), export=False)
    assert isinstance(model, RBLNGemma3ForConditionalGeneration)
    assert RBLNAutoModelForCausalLM.get_rbln_cls(tmp_path / "compiled") is RBLNGemma3ForConditionalGeneration
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "compiled")
    inputs = chat_inputs(processor)
    out = model.generate(**inputs, max_new_tokens=NEW)
    np.testing.assert_array_equal(out.numpy(), greedy(hf, inputs).numpy())
    assert processor.decode(out[0][inputs["input_ids"].shape[-1] :], skip_special_tokens=True) is not None
    assert (
        isinstance(model.config, transformers.Gemma3Config) and model.config.text_config.sliding_window == 8
    )
    assert model.language_model is model.runtime and model.vision_tower is model.vision
    assert list(model.compiled_models) == ["vision_tower", "prefill", "image_prefill", "decoder_batch_1"]
    logits = model(**inputs).logits
    with torch.no_grad():
        ref = hf(**inputs).logits[:, -1:]
    assert logits.shape == ref.shape and (logits - ref).abs().max() / ref.abs().max() <= TOL


def test_decoder_batch_sizes_pad_to_the_next_decoder_and_cost_its_size(text, variants):
    root, hf, batch2 = text
    batch1 = variants[0]  # compiled for one sequence (its extra fields change nothing in decode)
    model = RBLNGemma3ForCausalLM.from_pretrained(
        root / "ckpt", rbln_config={**TEXT, "batch_size": 2, "decoder_batch_sizes": [1]}, **CHIP
    )
    assert model.rbln_config.decoder_batch_sizes == [2, 1]
    assert list(model.compiled_models) == ["prefill", "decoder_batch_2", "decoder_batch_1"]
    one = torch.tensor([[2, 40, 41, 42, 43]])
    out = model.generate(one, max_new_tokens=6)
    np.testing.assert_array_equal(out.numpy(), greedy(hf, {"input_ids": one}, 6).numpy())
    decode_1 = model.last_report.decode.cycles
    batch1.generate(one, max_new_tokens=6)
    assert decode_1 == batch1.last_report.decode.cycles  # one sequence runs the 1-row decoder
    two = torch.tensor([[2, 40, 41, 42, 43], [2, 50, 51, 52, 53]])
    np.testing.assert_array_equal(
        model.generate(two, max_new_tokens=6).numpy(), greedy(hf, {"input_ids": two}, 6).numpy()
    )
    decode_2 = model.last_report.decode.cycles
    batch2.generate(two, max_new_tokens=6)
    assert decode_2 == batch2.last_report.decode.cycles > decode_1
    batch2.generate(one, max_new_tokens=6)  # no 1-row decoder: padded to 2 rows, costs 2 rows
    assert batch2.last_report.decode.cycles == decode_2


def test_model_save_dir_and_auto_from_model(text, tmp_path):
    root, hf, model = text
    ids = np.array([[2, 40, 41, 42]])
    want = model.generate(ids, max_new_tokens=4)
    saved = RBLNGemma3ForCausalLM.from_pretrained(
        root / "ckpt", model_save_dir=tmp_path / "kept", rbln_config={**TEXT, "batch_size": 2}, **CHIP
    )
    assert (
        saved.model_save_dir == str(tmp_path / "kept") and (tmp_path / "kept" / "rbln_config.json").exists()
    )
    np.testing.assert_array_equal(
        RBLNAutoModelForCausalLM.from_pretrained(tmp_path / "kept").generate(ids, max_new_tokens=4), want
    )
    converted = RBLNAutoModelForCausalLM.from_model(hf, rbln_config={**TEXT, "batch_size": 2}, **CHIP)
    assert isinstance(converted, RBLNGemma3ForCausalLM)
    np.testing.assert_array_equal(converted.generate(ids, max_new_tokens=4), want)
