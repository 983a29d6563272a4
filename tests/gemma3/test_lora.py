"""Multi-LoRA against peft (the oracle): tiny random Gemma3 models with random adapters of
different ranks and targets (one with rslora), compiled together; per-adapter greedy tokens and
per-step logits as peft's model with that adapter active, a mixed batch as each row alone,
switching adapters, save and reload, and every configuration error. fp32 numerics: the oracle's."""

import json

import numpy as np
import pytest

from gemma3 import (
    RBLNGemma3ForCausalLM,
    RBLNGemma3ForConditionalGeneration,
    RBLNLoRAAdapterConfig,
    RBLNLoRAConfig,
)
from tests.gemma3.oracle import tiny_image_model, tiny_model

torch = pytest.importorskip("torch", reason="the oracle extra is not installed")
peft = pytest.importorskip("peft", reason="the oracle extra is not installed")

TOL = 1e-4
NEW = 6
CHIP = dict(rbln_npu="tiny", rbln_numerics="fp32", rbln_prefill_chunk_size=64, rbln_max_seq_len=128)
# (name, rank, alpha, target_modules, use_rslora)
ADAPTERS = [
    ("alpha", 4, 8, ["q_proj", "v_proj"], False),
    ("beta", 8, 16, ["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], True),
    ("gamma", 2, 4, ["down_proj", "o_proj"], False),
]
PROMPTS = [[2, 17, 45, 99, 7, 250, 31], [2, 5, 6, 7], [2, 200, 201, 202, 203, 204, 100, 12, 13]]


def save_adapter(base, directory, seed, r, alpha, targets, rslora, regex_prefix=None):
    """A peft LoRA adapter with random A and B on ``base`` (a copy of it is wrapped)."""
    import copy

    torch.manual_seed(seed)
    # peft matches a regex against whole module names (model.language_model.layers.0...)
    modules = targets if regex_prefix is None else rf".*{regex_prefix}.*\.({'|'.join(targets)})"
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=modules, use_rslora=rslora, init_lora_weights=False
    )
    model = peft.get_peft_model(copy.deepcopy(base), config)
    model.save_pretrained(directory)
    return model.eval()


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = tiny_model(root / "ckpt", seed=3)
    oracles, adapters = {}, []
    for k, (name, r, alpha, targets, rslora) in enumerate(ADAPTERS):
        oracles[name] = save_adapter(base, root / name, 10 + k, r, alpha, targets, rslora)
        adapters.append(RBLNLoRAAdapterConfig(k + 1, name, root / name))
    model = RBLNGemma3ForCausalLM.from_pretrained(
        root / "ckpt", rbln_batch_size=3, rbln_lora_config=RBLNLoRAConfig(adapters), **CHIP
    )
    return root, base, oracles, model


def oracle_steps(model, prompt, new=NEW):
    """Greedy tokens and each step's logits of a torch model."""
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=new,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences[0, len(prompt) :].numpy(), np.stack([x[0].numpy() for x in out.logits])


def npu_steps(model, prompts, new=NEW):
    n = max(len(p) for p in prompts)
    ids = np.array([[0] * (n - len(p)) + p for p in prompts])
    mask = np.array([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return np.asarray(out.sequences)[:, n:], np.stack([np.asarray(x) for x in out.logits], axis=1)


@pytest.mark.parametrize("name", [a[0] for a in ADAPTERS])
def test_each_adapter_matches_peft(text, name):
    _, _, oracles, model = text
    model.set_adapter(name)
    tokens, logits = npu_steps(model, PROMPTS)
    for b, prompt in enumerate(PROMPTS):
        want_tokens, want_logits = oracle_steps(oracles[name], prompt)
        np.testing.assert_array_equal(tokens[b], want_tokens)
        np.testing.assert_allclose(logits[b], want_logits, atol=TOL, rtol=0)


def test_adapters_change_the_output(text):
    """The adapters are large enough to matter: each one's logits differ from the base model's."""
    _, base, oracles, model = text
    model.set_adapter("base")
    _, base_logits = npu_steps(model, PROMPTS[:1] * 3, new=1)
    _, want = oracle_steps(base, PROMPTS[0], new=1)
    np.testing.assert_allclose(base_logits[0], want, atol=TOL, rtol=0)
    for name in oracles:
        model.set_adapter(name)
        _, logits = npu_steps(model, PROMPTS[:1] * 3, new=1)
        assert np.abs(logits[0] - base_logits[0]).max() > 100 * TOL


def test_mixed_batch_equals_each_row_alone(text):
    _, _, _, model = text
    model.set_adapter(["alpha", "base", "gamma"])
    tokens, logits = npu_steps(model, PROMPTS)
    cost = model.last_report
    for b, name in enumerate(["alpha", "base", "gamma"]):
        model.set_adapter(name)
        alone_tokens, alone_logits = npu_steps(model, [PROMPTS[b]] * 3)
        np.testing.assert_array_equal(tokens[b], alone_tokens[b])
        np.testing.assert_allclose(logits[b], alone_logits[b], atol=TOL, rtol=0)
    assert cost is not None


def test_lora_kernels_show_in_the_reports(text):
    _, _, _, model = text
    model.set_adapter("beta")
    npu_steps(model, PROMPTS, new=2)
    rt = model.runtime
    # The adapters together target all 7 projections of each of the 3 layers: every one runs
    # the lora kernel (a row whose adapter skips it adds zeros), 3 prefills and 1 decode step.
    for phase, steps in (("prefill", 3), ("decode", 1)):
        names = [r.name for r in rt.cost[phase].reports]
        assert names.count("lora") == 7 * 3 * steps
        assert names.count("geglu_combine") == 3 * steps and "geglu_mlp" not in names


def test_switching_adapters_between_generate_calls(text):
    _, _, oracles, model = text
    for name in ("gamma", "alpha", "gamma"):
        model.set_adapter(name)
        tokens, _ = npu_steps(model, PROMPTS)
        np.testing.assert_array_equal(tokens[0], oracle_steps(oracles[name], PROMPTS[0])[0])


def test_save_and_reload_needs_no_adapters(text, tmp_path):
    root, _, _, model = text
    model.set_adapter(["beta", "alpha", "base"])
    tokens, logits = npu_steps(model, PROMPTS)
    model.save_pretrained(tmp_path / "compiled")
    saved = json.loads((tmp_path / "compiled" / "rbln_config.json").read_text())
    assert [a["lora_name"] for a in saved["lora_config"]["adapters"]] == ["alpha", "beta", "gamma"]
    # the adapters' directories are gone: the compiled weights hold them
    moved = tmp_path / "gone"
    for name, *_ in ADAPTERS:
        (root / name).rename(moved.with_name(f"gone-{name}"))
    try:
        again = RBLNGemma3ForCausalLM.from_pretrained(tmp_path / "compiled")
        again.set_adapter(["beta", "alpha", "base"])
        tokens2, logits2 = npu_steps(again, PROMPTS)
        np.testing.assert_array_equal(tokens2, tokens)
        np.testing.assert_array_equal(logits2, logits)
    finally:
        for name, *_ in ADAPTERS:
            moved.with_name(f"gone-{name}").rename(root / name)


def test_set_adapter_errors(text, tmp_path):
    root, _, _, model = text
    with pytest.raises(
        ValueError, match=r"Adapter\(s\) \['delta'\] not found. Available adapters: \['base', 'alpha'"
    ):
        model.set_adapter("delta")
    with pytest.raises(ValueError, match=r"lora_int_ids size mismatch: got 2, expected 3"):
        model.set_adapter(["alpha", "beta"])
    plain = RBLNGemma3ForCausalLM.from_pretrained(root / "ckpt", **CHIP)
    with pytest.raises(ValueError, match=r"Model is not configured with LoRA. Cannot set adapter."):
        plain.set_adapter("alpha")
    fresh = RBLNGemma3ForCausalLM.from_pretrained(
        root / "ckpt",
        rbln_lora_config={"adapters": [{"lora_int_id": 1, "lora_name": "a", "lora_path": root / "alpha"}]},
        **CHIP,
    )
    with pytest.raises(ValueError, match="lora_int_id is required when using LoRA"):
        fresh.generate(np.array([PROMPTS[0]]), max_new_tokens=1)


def test_config_errors(text, tmp_path):
    root = text[0]
    a = root / "alpha"
    A = RBLNLoRAAdapterConfig
    with pytest.raises(ValueError, match="lora_int_id cannot be None"):
        A(None, "x", a)
    with pytest.raises(ValueError, match="lora_int_id must be an integer, got <class 'str'>"):
        A("1", "x", a)
    with pytest.raises(ValueError, match="LoRA adapter path does not exist: /no/such/adapter"):
        A(1, "x", "/no/such/adapter")
    with pytest.raises(
        ValueError, match="Failed to download LoRA adapter 'no-org/no-adapter' from HuggingFace Hub"
    ):
        A(1, "x", "no-org/no-adapter")
    with pytest.raises(ValueError, match="r must be a positive integer, got 0"):
        A(1, "x", a, r=0)
    with pytest.raises(ValueError, match="lora_alpha must be positive, got -1"):
        A(1, "x", a, lora_alpha=-1)
    with pytest.raises(NotImplementedError, match="bias != 'none' is not supported yet"):
        A(1, "x", a, bias="all")
    loaded = A(1, "x", a)  # unset fields from adapter_config.json
    assert (loaded.r, loaded.lora_alpha, sorted(loaded.target_modules), loaded.use_rslora) == (
        4,
        8,
        ["q_proj", "v_proj"],
        False,
    )
    with pytest.raises(ValueError, match="adapters list cannot be empty"):
        RBLNLoRAConfig([])
    with pytest.raises(ValueError, match="Invalid adapter type: <class 'int'>"):
        RBLNLoRAConfig([3])
    with pytest.raises(ValueError, match="lora_int_id=0 is reserved for base model"):
        RBLNLoRAConfig([A(0, "x", a)])
    with pytest.raises(ValueError, match="All adapter IDs must be unique"):
        RBLNLoRAConfig([A(1, "x", a), A(1, "y", a)])
    with pytest.raises(ValueError, match=r"Adapter IDs must be contiguous and start from 0. Found \[0, 2\]"):
        RBLNLoRAConfig([A(2, "x", a)])
    with pytest.raises(ValueError, match=r"max_lora_rank \(2\) must be >= actual max rank \(4\)"):
        RBLNLoRAConfig([A(1, "x", a)], max_lora_rank=2)
    cfg = RBLNLoRAConfig([{"lora_int_id": 1, "lora_name": "x", "lora_path": a}], max_lora_rank=16)
    assert (cfg.num_adapters, cfg.adapter_ids, cfg.adapter_names, cfg.max_lora_rank) == (
        2,
        [0, 1],
        ["base", "x"],
        16,
    )
    assert cfg.get_adapter_by_name("x").lora_int_id == 1 and cfg.get_adapter_by_id(0).lora_name == "base"
    assert cfg.get_adapter_by_id(5) is None and cfg.get_adapter_by_name("y") is None


def test_adapter_file_errors(text, tmp_path):
    root = text[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((root / "alpha" / "adapter_config.json").read_text())
    (bad / "adapter_model.bin").write_bytes(b"pickle")
    lora = {"adapters": [{"lora_int_id": 1, "lora_name": "bad", "lora_path": bad}]}
    with pytest.raises(
        FileNotFoundError, match=r"no adapter_model.safetensors in .*adapter_model.bin is a pickle"
    ):
        RBLNGemma3ForCausalLM.from_pretrained(root / "ckpt", rbln_lora_config=lora, **CHIP)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(root / "alpha" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    for change, message in (
        (lambda t: t.pop(key), r"layers.0.self_attn.q_proj.lora_A.weight is missing"),
        (lambda t: t.update({key: t[key][:, :5]}), r"q_proj.lora_A.weight is \(4, 5\), expected \(4, 64\)"),
        (
            lambda t: t.update({"base_model.model.lm_head.lora_A.weight": t[key]}),
            r"holds 'base_model.model.lm_head",
        ),
        (
            lambda t: [t.pop(k) for k in list(t) if ".1.self_attn.v_proj" in k],
            r"no weights for layer 1's v_proj, which target_modules",
        ),
    ):
        t = dict(tensors)
        change(t)
        save_file(t, bad / "adapter_model.safetensors")
        with pytest.raises(ValueError, match=message):
            RBLNGemma3ForCausalLM.from_pretrained(root / "ckpt", rbln_lora_config=lora, **CHIP)


def test_image_text_language_side_matches_peft(tmp_path):
    base = tiny_image_model(tmp_path / "ckpt", seed=5)
    oracles, adapters = {}, []
    for k, (name, r, alpha, targets, rslora) in enumerate(ADAPTERS[:2]):
        oracles[name] = save_adapter(
            base, tmp_path / name, 20 + k, r, alpha, targets, rslora, "language_model"
        )
        adapters.append({"lora_int_id": k + 1, "lora_name": name, "lora_path": tmp_path / name})
    model = RBLNGemma3ForConditionalGeneration.from_pretrained(
        tmp_path / "ckpt",
        rbln_npu="tiny",
        rbln_numerics="fp32",
        rbln_language_model={
            "prefill_chunk_size": 64,
            "max_seq_len": 128,
            "lora_config": {"adapters": adapters},
        },
    )
    for name in oracles:
        model.set_adapter(name)
        tokens, logits = npu_steps(model, PROMPTS[:1])
        want_tokens, want_logits = oracle_steps(oracles[name], PROMPTS[0])
        np.testing.assert_array_equal(tokens[0], want_tokens)
        np.testing.assert_allclose(logits[0], want_logits, atol=TOL, rtol=0)


def test_estimate_with_lora_equals_the_compiled_models_cycles(text):
    """gemma3.estimate plans the LoRA kernels as the model runs them (every projection targeted
    by some adapter, rank padded to the largest, 3 adapters and the base one)."""
    from gemma3.estimate import estimate

    root, _, _, model = text
    model.set_adapter(["alpha", "beta", "base"])
    ids = (np.arange(70) % 290 + 3)[None].repeat(3, 0)
    model.generate(ids, max_new_tokens=4)
    reports = model.runtime.reports()
    e = estimate(
        root / "ckpt" / "config.json",
        "tiny",
        batch=3,
        prompt_tokens=70,
        new_tokens=4,
        chunk=64,
        max_seq_len=128,
        lora_rank=8,
        lora_adapters=3,
    )
    assert (e.prefill.cycles, e.decode.cycles) == (reports["prefill"].cycles, reports["decode"].cycles)
    kernels = e.to_dict()["phases"]["decode_step"]["kernels"]
    assert kernels["lora"]["calls"] == 7 * 3  # every projection of the 3 layers
    plain = estimate(root / "ckpt" / "config.json", "tiny", batch=3, prompt_tokens=70, new_tokens=4, chunk=64)
    assert "lora" not in plain.to_dict()["phases"]["decode_step"]["kernels"]
    with pytest.raises(ValueError, match=r"lora_targets \['lm'\]: the projections are"):
        estimate(root / "ckpt" / "config.json", "tiny", lora_rank=8, lora_targets=["q", "lm"])
