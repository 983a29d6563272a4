"""Bad input to generate and to compiling raises a ValueError naming the thing and the numbers,
before anything runs; input that only looks odd (padding of any id, an image token past the
vocabulary with its image) still works."""

import numpy as np
import pytest

from gemma3 import NPUGemma3ForCausalLM, NPUGemma3ForConditionalGeneration
from tests.gemma3.oracle import tiny_image_model, tiny_model

pytest.importorskip("torch", reason="the oracle extra is not installed")

RBLN = dict(rbln_npu="tiny", rbln_numerics="fp32", rbln_prefill_chunk_size=64)
IDS = np.random.default_rng(0).integers(3, 300, size=(2, 6))


def with_id(b, p, value):
    ids = IDS.copy()
    ids[b, p] = value
    return ids


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    directory = tmp_path_factory.mktemp("text")
    hf = tiny_model(directory)  # vocabulary of 300, 512 positions
    model = NPUGemma3ForCausalLM.from_pretrained(directory, rbln_max_seq_len=128, rbln_batch_size=2, **RBLN)
    return directory, hf, model


@pytest.mark.parametrize(
    "ids, mask, message",
    [
        (np.zeros((1, 0), np.int64), None, r"input_ids is empty \(shape \(1, 0\)\)"),
        ([], None, r"input_ids is empty \(shape \(1, 0\)\)"),
        (np.zeros((0, 5), np.int64), None, r"input_ids is empty \(shape \(0, 5\)\)"),
        (
            IDS,
            [[1] * 6, [0] * 6],
            r"attention_mask row\(s\) \[1\] are all zeros: sequence 1 has no prompt token \(of 6\)",
        ),
        (IDS, [[1] * 6, [1] * 5 + [2]], r"attention_mask must hold 0 and 1 only, got 2 at \[1, 5\]"),
        (IDS, np.ones((2, 5)), r"attention_mask \(2, 5\) must have the shape of input_ids \(2, 6\)"),
        (
            with_id(1, 2, 300),
            None,
            r"input_ids\[1, 2\] = 300 is outside the vocabulary of 300 tokens \(ids 0\.\.299\)$",
        ),
        (with_id(0, 0, -1), None, r"input_ids\[0, 0\] = -1 is outside the vocabulary of 300 tokens"),
    ],
)
def test_bad_prompts_are_named(text, ids, mask, message):
    with pytest.raises(ValueError, match=message):
        text[2].generate(ids, attention_mask=mask, max_new_tokens=2)


def test_padding_may_hold_any_id(text):
    model = text[2]
    mask = np.array([[0, 0, 1, 1, 1, 1], [1] * 6])
    padded = model.generate(with_id(0, 0, -7), attention_mask=mask, max_new_tokens=3)
    np.testing.assert_array_equal(
        padded[:, 1:], model.generate(IDS, attention_mask=mask, max_new_tokens=3)[:, 1:]
    )


def test_prompt_and_new_tokens_beyond_max_seq_len(text):
    model = text[2]
    with pytest.raises(ValueError, match=r"prompt of 6 tokens \+ 123 new tokens exceeds max_seq_len 128"):
        model.generate(IDS, max_new_tokens=123)
    with pytest.raises(ValueError, match=r"prompt of 6 tokens \+ 194 new tokens exceeds max_seq_len 128"):
        model.generate(IDS, max_length=200)  # max_length counts the prompt


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("batch_size", 4, r"batch_size was 2 when compiled and is 4 now"),
        ("max_seq_len", 64, r"max_seq_len was 128 when compiled and is 64 now"),
        ("prefill_chunk_size", 128, r"prefill_chunk_size was 64 when compiled and is 128 now"),
        ("numerics", "bf16", r"numerics was 'fp32' when compiled and is 'bf16' now"),
        ("npu", "atom", r"npu.name was 'tiny' when compiled and is 'atom' now"),
    ],
)
def test_an_edited_rbln_config_is_refused_at_generate(text, monkeypatch, field, value, message):
    model = text[2]
    monkeypatch.setattr(model.rbln_config, field, value)
    with pytest.raises(
        ValueError, match=r"model.rbln_config no longer matches what was compiled: .*" + message
    ):
        model.generate(IDS, max_new_tokens=2)
    monkeypatch.undo()  # set back: the model runs again
    assert model.generate(IDS, max_new_tokens=2).shape == (2, 8)


def test_max_seq_len_is_checked_when_compiling(text):
    directory, hf, _ = text
    with pytest.raises(
        ValueError, match=r"max_seq_len 1024 exceeds max_position_embeddings 512 \(config.json\)"
    ):
        NPUGemma3ForCausalLM.from_pretrained(directory, rbln_max_seq_len=1024, **RBLN)
    with pytest.raises(ValueError, match=r"max_seq_len 1024 exceeds max_position_embeddings 512"):
        NPUGemma3ForCausalLM.from_model(hf, rbln_max_seq_len=1024, **RBLN)
    with pytest.raises(ValueError, match=r"max_seq_len 60 is below prefill_chunk_size 64"):
        NPUGemma3ForCausalLM.from_pretrained(directory, rbln_max_seq_len=60, **RBLN)
    with pytest.raises(ValueError, match=r"max_seq_len 512 is below prefill_chunk_size 1024"):  # unset: 512
        NPUGemma3ForCausalLM.from_pretrained(directory, **{**RBLN, "rbln_prefill_chunk_size": 1024})


def test_the_image_model_takes_its_image_token_and_refuses_the_rest(tmp_path, monkeypatch):
    # the image token (299) past the text vocabulary (299 tokens), as in released Gemma3
    tiny_image_model(tmp_path, text={"vocab_size": 299})
    rbln = dict(rbln_npu="tiny", rbln_numerics="fp32")
    model = NPUGemma3ForConditionalGeneration.from_pretrained(
        tmp_path, **rbln, rbln_language_model={"prefill_chunk_size": 64, "max_seq_len": 128}
    )
    ids = np.array([[2, 5, 297, 299, 299, 299, 299, 298, 7]])
    pixels = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    assert model.generate(ids, pixel_values=pixels, max_new_tokens=2).shape == (1, 11)
    with pytest.raises(ValueError, match=r"prompt of 9 tokens \+ 120 new tokens exceeds max_seq_len 128"):
        model.generate(ids, pixel_values=pixels, max_new_tokens=120)
    with pytest.raises(ValueError, match=r"image count mismatch: the prompts hold 1 image\(s\)"):
        model.generate(ids, max_new_tokens=2)
    ids[0, 1] = -5
    with pytest.raises(
        ValueError,
        match=r"input_ids\[0, 1\] = -5 is outside the vocabulary of 299 tokens \(ids 0\.\.298\) and is not "
        r"the image token 299",
    ):
        model.generate(ids, pixel_values=pixels, max_new_tokens=2)
    monkeypatch.setattr(model.rbln_config.language_model, "max_seq_len", 64)
    with pytest.raises(ValueError, match=r"language_model.max_seq_len was 128 when compiled and is 64 now"):
        model.generate(ids, pixel_values=pixels, max_new_tokens=2)
    with pytest.raises(
        ValueError, match=r"language_model.max_seq_len 1024 exceeds max_position_embeddings 512"
    ):
        NPUGemma3ForConditionalGeneration.from_pretrained(
            tmp_path, **rbln, rbln_language_model={"prefill_chunk_size": 64, "max_seq_len": 1024}
        )
    with pytest.raises(
        ValueError, match=r"language_model.max_seq_len 100 is below language_model.prefill_chunk_size 128"
    ):
        NPUGemma3ForConditionalGeneration.from_pretrained(
            tmp_path, **rbln, rbln_language_model={"prefill_chunk_size": 128, "max_seq_len": 100}
        )
