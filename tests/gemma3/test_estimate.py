"""Plan-only estimates: equal to what the compiled model's kernels cost, for any config style."""

import json
import subprocess
import sys

import numpy as np
import pytest

from gemma3.estimate import estimate, read_config
from npu_emulator import TINY
from tests.gemma3.oracle import tiny_config, tiny_model

WORKLOAD = dict(batch=2, prompt_tokens=70, new_tokens=4, chunk=64, max_seq_len=128)


def write(path, d):
    path.write_text(json.dumps(d))
    return path


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    pytest.importorskip("torch", reason="the oracle extra is not installed")
    d = tmp_path_factory.mktemp("tiny")
    tiny_model(d)
    return d


def test_estimate_equals_the_compiled_models_kernel_cycles(gemma_dir):
    from gemma3 import NPUGemma3ForCausalLM

    model = NPUGemma3ForCausalLM.from_pretrained(
        gemma_dir, rbln_npu="tiny", rbln_max_seq_len=128, rbln_batch_size=2, rbln_prefill_chunk_size=64
    )
    ids = (np.arange(70) % 290 + 3)[None].repeat(2, 0)
    model.generate(ids, max_new_tokens=4)
    reports = model.runtime.reports()
    e = estimate(gemma_dir / "config.json", "tiny", **WORKLOAD)
    # Two sequences of two chunks (the second padded from 6 tokens to 64), then 3 decode steps.
    assert (e.prefill.cycles, e.prefill.calls) == (reports["prefill"].cycles, 4)
    assert (e.decode.cycles, e.decode.calls) == (reports["decode"].cycles, 3)
    assert e.prefill_ms == pytest.approx(reports["prefill"].time_us / 1e3)
    d = e.to_dict()
    assert d["prefill_chunks"] == 2 and d["decode_ms"] == pytest.approx(reports["decode"].time_us / 1e3)
    roles = d["phases"]["prefill"]["kernels"]
    assert sum(r["cycles"] for r in roles.values()) == e.prefill.cycles
    # Per layer and chunk: qkv and o projections, the MLP, one attention; the LM head once a sequence.
    assert (roles["qkv_proj"]["calls"], roles["mlp"]["calls"], roles["lm_head"]["calls"]) == (12, 12, 2)


def test_image_text_config_costs_its_text_stack(tmp_path, gemma_dir):
    text = json.loads((gemma_dir / "config.json").read_text())
    wrapped = write(tmp_path / "config.json", {"model_type": "gemma3", "text_config": text})
    a = estimate(wrapped, "tiny", **WORKLOAD)
    b = estimate(gemma_dir / "config.json", "tiny", **WORKLOAD)
    assert (a.prefill.cycles, a.decode.cycles) == (b.prefill.cycles, b.decode.cycles)


def qwen3(**overrides):
    d = dict(
        model_type="qwen3",
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rope_theta=1e6,
        hidden_act="silu",
        tie_word_embeddings=True,
    )
    d.update(overrides)
    return d


def test_llama_style_config_costs_as_gemma3_with_every_layer_global(tmp_path):
    pytest.importorskip("transformers", reason="the oracle extra is not installed")
    q = estimate(write(tmp_path / "q.json", qwen3()), "tiny", **WORKLOAD)
    # The same shapes as a Gemma3 text config whose layers are all global.
    g = tiny_config(layer_types=["full_attention"] * 3).to_dict()
    e = estimate(write(tmp_path / "g.json", g), "tiny", **WORKLOAD)
    assert (q.prefill.cycles, q.decode.cycles) == (e.prefill.cycles, e.decode.cycles)
    c, scale, family = read_config(tmp_path / "q.json")
    assert (scale, family, c.attention_scale) == (1.0, "qwen3", 16**-0.5)
    assert set(c.layer_types) == {"full_attention"}
    # Llama without head_dim or num_key_value_heads: hidden / heads, multi-head attention.
    llama = qwen3(model_type="llama", head_dim=None, num_key_value_heads=None)
    c, _, _ = read_config(write(tmp_path / "l.json", llama))
    assert (c.head_dim, c.num_key_value_heads) == (16, 4)


def test_fp32_weights_stream_twice_the_bytes(tmp_path):
    path = write(tmp_path / "q.json", qwen3())
    bf, fp = (estimate(path, "tiny", weights_dtype=w, **WORKLOAD) for w in ("bf16", "fp32"))
    for role in ("qkv_proj", "mlp"):  # weights and activations, all in the device dtype
        assert fp.decode_step.roles[role].dram_bytes == 2 * bf.decode_step.roles[role].dram_bytes
    # The LM head also reads int32 vocabulary ids: at least 2 more bytes per weight.
    extra = fp.decode_step.roles["lm_head"].dram_bytes - bf.decode_step.roles["lm_head"].dram_bytes
    assert extra >= 2 * 64 * 300
    assert fp.decode_step.cycles > bf.decode_step.cycles


def test_host_time_is_added_per_call(tmp_path):
    path = write(tmp_path / "q.json", qwen3())
    cfg = TINY.replace(host_step_us=50.0, kernel_launch_cycles=100)
    e = estimate(path, cfg, **WORKLOAD)
    base = estimate(path, "tiny", **WORKLOAD)
    kernels = sum(r.calls for r in base.prefill.roles.values())
    assert e.prefill.cycles == base.prefill.cycles + 100 * kernels
    assert e.prefill_ms == pytest.approx(e.prefill.cycles / cfg.clock_hz * 1e3 + 4 * 0.05)
    assert e.decode_step_ms == pytest.approx(e.decode_step.cycles / cfg.clock_hz * 1e3 + 0.05)


def test_rbln_presets_plan_a_model(tmp_path):
    path = write(tmp_path / "q.json", qwen3())
    for npu in ("rbln-ca25", "rebel100"):
        e = estimate(path, npu, prompt_tokens=64, new_tokens=2, chunk=64)
        assert e.prefill.cycles > 0 and e.npu == npu


@pytest.mark.parametrize(
    "config, kwargs, error, match",
    [
        (None, {}, FileNotFoundError, r"missing\.json: no such config file"),
        ("{not json", {}, ValueError, r"not valid JSON"),
        ([1, 2], {}, ValueError, r"expected a JSON object, got list"),
        (qwen3(model_type="mamba"), {}, ValueError, r"model_type 'mamba' is not one the estimate costs"),
        (
            {k: v for k, v in qwen3().items() if k not in ("hidden_size", "vocab_size")},
            {},
            ValueError,
            r"missing field\(s\) \['vocab_size', 'hidden_size'\]",
        ),
        (qwen3(num_hidden_layers=0), {}, ValueError, r"num_hidden_layers must be a positive integer, got 0"),
        (qwen3(num_key_value_heads=3), {}, ValueError, r"num_attention_heads 4 is not a multiple of .* 3"),
        (
            qwen3(),
            {"chunk": 100},
            ValueError,
            r"chunk must be divisible by 64 \(as prefill_chunk_size\), got 100",
        ),
        (qwen3(), {"batch": 0}, ValueError, r"batch must be a positive integer, got 0"),
        (qwen3(), {"weights_dtype": "int8"}, ValueError, r"weights_dtype must be one of \('bf16', 'fp32'\)"),
        (
            qwen3(),
            {"max_seq_len": 32},
            ValueError,
            r"prompt_tokens \+ new_tokens = 256 exceeds max_seq_len 32",
        ),
        (qwen3(), {"tp": 0}, ValueError, r"tp must be a positive integer, got 0"),
        (qwen3(), {"npu": "tpu"}, ValueError, r"unknown NPU preset 'tpu'"),
    ],
)
def test_bad_input_is_refused_with_its_reason(tmp_path, config, kwargs, error, match):
    path = tmp_path / "missing.json"
    if isinstance(config, str):
        path.write_text(config)
    elif config is not None:
        write(path, config)
    kwargs = {"npu": "tiny", **kwargs}
    with pytest.raises(error, match=match):
        estimate(path, kwargs.pop("npu"), **kwargs)


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "gemma3", "estimate", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_prints_the_table_and_json_last(tmp_path):
    path = write(tmp_path / "config.json", qwen3())
    args = ["--config", str(path), "--npu", "tiny", "--batch", "2", "--prompt-tokens", "70"]
    args += ["--new-tokens", "4", "--chunk", "64", "--max-seq-len", "128"]
    out = cli(*args, "--json")
    assert out.returncode == 0, out.stderr
    assert "decode step" in out.stdout and "kernel role" in out.stdout
    got = json.loads(out.stdout.strip().splitlines()[-1])
    want = estimate(path, "tiny", **WORKLOAD).to_dict()
    assert got["prefill_ms"] == pytest.approx(want["prefill_ms"])
    assert got["decode_step_ms"] == pytest.approx(want["decode_step_ms"])
    assert got["phases"]["decode_step"]["kernels"].keys() == want["phases"]["decode_step"]["kernels"].keys()


def test_cli_reports_errors_without_a_traceback(tmp_path):
    path = write(tmp_path / "config.json", qwen3())
    out = cli("--config", str(path), "--npu", "tiny", "--tp", "0")
    assert out.returncode == 1 and "error: tp must be a positive integer, got 0" in out.stderr
    out = cli("--config", str(tmp_path / "nope.json"))
    assert out.returncode == 1 and "nope.json: no such config file" in out.stderr
