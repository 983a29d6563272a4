import pytest

from gemma3.tokenizer import GEMMA3_CHAT_TEMPLATE, Gemma3Tokenizer, TokenizerError
from tests.gemma3.tokenizer_fixture import build_tokenizer

TEXTS = [
    "The capital of France is",
    "  two  spaces\n\nnewlines\tand tabs",
    "12345 + 678 = ?",
    "emoji \U0001f600 and \u4e2d\u6587",
    "def f(x):\n    return x",
]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there "},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]},
]


def test_built_in_chat_template_renders_gemma_turns(tmp_path):
    tok = Gemma3Tokenizer(build_tokenizer(tmp_path))
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    with pytest.raises(TokenizerError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_left_padded_batches(tmp_path):
    tok = Gemma3Tokenizer(build_tokenizer(tmp_path))
    enc = tok(["Hello", "zebra quartz xylophone jumps"])
    short = tok.encode("Hello")
    assert enc["input_ids"].shape[0] == 2
    assert list(enc["input_ids"][0, -len(short) :]) == short
    assert enc["attention_mask"][0].sum() == len(short) and enc["attention_mask"][0, 0] == 0
    assert enc["input_ids"][0, 0] == tok.pad_token_id


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Gemma3Tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="not a tokenizers file"):
        Gemma3Tokenizer(tmp_path)


def test_agrees_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the oracle extra is not installed")
    build_tokenizer(tmp_path, with_template=GEMMA3_CHAT_TEMPLATE)
    ours = Gemma3Tokenizer(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"], text
        assert ours.decode(ours.encode(text), skip_special_tokens=True) == hf.decode(
            hf(text)["input_ids"], skip_special_tokens=True
        )
    assert ours.apply_chat_template(CHAT) == hf.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=True
    )
    assert ours.apply_chat_template(CHAT, add_generation_prompt=False) == hf.apply_chat_template(
        CHAT, tokenize=False
    )
