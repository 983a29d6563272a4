"""Our packages and the Hugging Face stack in one process, from any directory.

transformers (5.25 and newer) depends on Hugging Face's ``kernels`` distribution; a package of
ours under a name that a distribution on the index uses shadows it (or is shadowed by it)
depending on the working directory. The script below imports transformers' Gemma3 classes,
Hugging Face's ``kernels`` and every package of ours in one process, then compiles a tiny
random Gemma3, saves it, loads the compiled directory back (saved plans name our kernels
through ``npu_kernels.registry``) and compares greedy tokens with transformers'. It runs in
this process, and in subprocesses from the repository root and from a temporary directory.
"""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, sys, tempfile

import numpy as np
import torch
import transformers
from transformers import Gemma3ForCausalLM, Gemma3ForConditionalGeneration, Gemma3TextConfig

import gemma3
import npu_emulator
import npu_kernels
from gemma3 import RBLNGemma3ForCausalLM

try:
    import kernels as hf_kernels  # Hugging Face's, a dependency of newer transformers
except ImportError:
    hf_kernels = None

torch.manual_seed(0)
config = Gemma3TextConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
    sliding_window=8, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16,
    pad_token_id=0, eos_token_id=1, bos_token_id=2,
)
hf = Gemma3ForCausalLM(config).eval()
ids = np.array([[2, 5, 9, 13, 7]])
with tempfile.TemporaryDirectory() as src, tempfile.TemporaryDirectory() as out:
    hf.save_pretrained(src)
    compiled = RBLNGemma3ForCausalLM.from_pretrained(
        src, rbln_npu="tiny", rbln_numerics="fp32", rbln_max_seq_len=64, rbln_prefill_chunk_size=64
    )
    compiled.save_pretrained(out)
    loaded = RBLNGemma3ForCausalLM.from_pretrained(out, export=False)
    ours = loaded.generate(ids, max_new_tokens=6, eos_token_id=[])
with torch.no_grad():
    ref = hf.generate(torch.from_numpy(ids), max_new_tokens=6, do_sample=False, eos_token_id=None)
print(json.dumps({
    "modules": {m.__name__: m.__file__ for m in (gemma3, npu_emulator, npu_kernels, transformers)},
    "hf_kernels": getattr(hf_kernels, "__file__", None),
    "hf_kernels_has_ours": hasattr(hf_kernels, "registry"),
    "ours": np.asarray(ours).tolist(),
    "transformers": ref.numpy().tolist(),
    "cwd_on_path": sys.path[0],
}))
"""


def ours(path) -> bool:
    """Whether a module file is one of the repository's top-level packages."""
    return pathlib.Path(path).resolve().parent.parent == ROOT


def check(result: dict):
    for name in ("gemma3", "npu_emulator", "npu_kernels"):
        assert pathlib.Path(result["modules"][name]).resolve() == ROOT / name / "__init__.py"
    assert not ours(result["modules"]["transformers"])
    if result["hf_kernels"] is not None:  # installed: it is Hugging Face's, not a package of ours
        assert not ours(result["hf_kernels"]) and not result["hf_kernels_has_ours"]
    assert result["ours"] == result["transformers"]


def run_script(cwd) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(autouse=True)
def _oracle():
    pytest.importorskip("torch", reason="the oracle extra is not installed")
    pytest.importorskip("transformers", reason="the oracle extra is not installed")


def test_in_this_process(capsys):
    exec(compile(SCRIPT, "coexistence", "exec"), {"__name__": "coexistence"})
    check(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))


def test_from_the_repository_root():
    # ``python -c`` puts the working directory first on sys.path: a top-level folder of ours
    # named like an installed distribution would shadow it here.
    result = run_script(ROOT)
    assert result["cwd_on_path"] == ""
    check(result)


def test_from_another_directory(tmp_path):
    # Away from the repository, the installed distributions are all there is: one of theirs
    # named like a package of ours would shadow it here.
    check(run_script(tmp_path))


def test_the_cli_runs_from_another_directory(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "gemma3", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    assert "generate" in out.stdout
