"""`python -m gemma3` end to end on a tiny model with a real (small) tokenizer."""

import json
import subprocess
import sys

import pytest

from tests.gemma3.oracle import tiny_model
from tests.gemma3.tokenizer_fixture import build_tokenizer


@pytest.fixture()
def model_dir(tmp_path):
    pytest.importorskip("torch", reason="the oracle extra is not installed")
    build_tokenizer(tmp_path)
    vocab = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"]
    tiny_model(tmp_path, vocab_size=len(vocab) + 8)
    return tmp_path


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "gemma3", *args], capture_output=True, text=True, timeout=600
    )


def test_help_lists_every_command():
    out = run("--help")
    assert out.returncode == 0 and "generate" in out.stdout


def test_generate_streams_text_and_prints_the_cost_table(model_dir, tmp_path):
    trace = tmp_path / "run.json"
    out = run(
        "generate",
        "--model",
        str(model_dir),
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "5",
        "--npu",
        "tiny",
        "--trace",
        str(trace),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("The capital of France is")
    for part in ("phase", "prefill", "decode", "emulated cycles", "host tok/s"):
        assert part in out.stdout
    assert json.loads(trace.read_text())["traceEvents"]
    chat = run(
        "generate",
        "--model",
        str(model_dir),
        "--prompt",
        "Hello",
        "--chat",
        "--max-new-tokens",
        "3",
        "--npu",
        "tiny",
        "--temperature",
        "0.8",
        "--top-k",
        "5",
        "--seed",
        "1",
    )
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.startswith("Hello\n")


def test_bad_model_directory_is_a_clear_error(tmp_path):
    out = run("generate", "--model", str(tmp_path / "missing"), "--prompt", "hi")
    assert out.returncode != 0
    assert "missing" in out.stderr


def test_generate_with_a_lora_adapter(model_dir, tmp_path, capsys):
    """``--lora NAME=PATH --adapter NAME``: the streamed text is what the Python API generates
    with that adapter set (bf16, as the CLI runs; tests/gemma3/test_lora.py holds peft parity)."""
    pytest.importorskip("peft", reason="the oracle extra is not installed")
    import transformers

    from gemma3 import RBLNGemma3ForCausalLM
    from gemma3.cli import main
    from gemma3.tokenizer import Gemma3Tokenizer
    from tests.gemma3.test_lora import save_adapter

    base = transformers.Gemma3ForCausalLM.from_pretrained(model_dir).eval()
    save_adapter(base, tmp_path / "style", 4, 8, 64, ["q_proj", "down_proj"], False)
    tok = Gemma3Tokenizer(str(model_dir))
    prompt = "The capital of France is"
    ids = tok.encode(prompt, add_special_tokens=True)
    lora = {"adapters": [{"lora_int_id": 1, "lora_name": "style", "lora_path": tmp_path / "style"}]}
    api = RBLNGemma3ForCausalLM.from_pretrained(
        model_dir, rbln_npu="tiny", rbln_max_seq_len=64, rbln_prefill_chunk_size=64, rbln_lora_config=lora
    )
    texts = {}
    for name in ("style", "base"):
        api.set_adapter(name)
        texts[name] = tok.decode(
            api.generate([ids], max_new_tokens=4)[0][len(ids) :], skip_special_tokens=True
        )
    assert texts["style"] != texts["base"]
    args = [
        "generate",
        "--model",
        str(model_dir),
        "--prompt",
        prompt,
        "--max-new-tokens",
        "4",
        "--npu",
        "tiny",
    ]
    lora = ["--lora", f"style={tmp_path / 'style'}"]
    for name in ("style", "base"):
        assert main([*args, *lora, "--adapter", name]) == 0
        assert capsys.readouterr().out.startswith(prompt + texts[name] + "\n")
    assert main([*args, *lora, "--adapter", "nope"]) == 1
    assert "Adapter(s) ['nope'] not found. Available adapters: ['base', 'style']" in capsys.readouterr().err
    assert main([*args, "--lora", "style"]) == 1
    assert "--lora 'style': expected NAME=PATH" in capsys.readouterr().err
    assert main([*args, "--adapter", "style"]) == 1
    assert "Model is not configured with LoRA" in capsys.readouterr().err


def test_text_stream_writes_to_stdout_as_it_is_when_made(monkeypatch):
    # Not the sys.stdout of when the module was imported: a test's capture, long closed, once was.
    import io

    from gemma3.cli import TextStream

    class Letters:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(96 + i) for i in ids)

    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    stream = TextStream(Letters())
    for token in ([9], [1], [2]):  # the prompt, then two tokens
        stream.put(token)
    assert out.getvalue() == "ab"
