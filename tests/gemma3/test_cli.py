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
