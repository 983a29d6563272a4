import json

import pytest

from gemma3.config import FULL, SLIDING, Gemma3TextConfig

BASE = {
    "model_type": "gemma3_text",
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 7,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "sliding_window": 8,
    "max_position_embeddings": 256,
}

V4 = {
    **BASE,
    "rope_theta": 1e6,
    "rope_local_base_freq": 1e4,
    "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    "sliding_window_pattern": 6,
}
V5 = {
    **BASE,
    "layer_types": [SLIDING] * 5 + [FULL] + [SLIDING],
    "rope_parameters": {
        FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        SLIDING: {"rope_type": "default", "rope_theta": 1e4},
    },
}


@pytest.mark.parametrize("raw", [V4, V5], ids=["transformers-4", "transformers-5"])
def test_both_styles_read_the_same(raw):
    c = Gemma3TextConfig.from_dict(raw)
    assert c.layer_types == tuple([SLIDING] * 5 + [FULL] + [SLIDING])
    assert c.rope[FULL].theta == 1e6 and c.rope[FULL].kind == "linear" and c.rope[FULL].factor == 8.0
    assert c.rope[SLIDING].theta == 1e4 and c.rope[SLIDING].factor == 1.0
    assert c.attention_scale == 16**-0.5  # query_pre_attn_scalar defaults to head_dim


def test_defaults_pattern_and_text_config_nesting():
    c = Gemma3TextConfig.from_dict({"model_type": "gemma3", "text_config": {**BASE, "num_hidden_layers": 12}})
    assert [i for i, t in enumerate(c.layer_types) if t == FULL] == [5, 11]
    assert c.rope[FULL].theta == 1e6 and c.rope[SLIDING].theta == 1e4


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"model_type": "llama"}, ValueError, "model_type 'llama' is not gemma3_text"),
        ({"num_key_value_heads": 3}, ValueError, "not a multiple of num_key_value_heads 3"),
        ({"layer_types": [SLIDING] * 3}, ValueError, "layer_types must list 7 entries"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, NotImplementedError, "rope_type 'yarn'"),
        ({"attn_logit_softcapping": 50.0}, NotImplementedError, "attn_logit_softcapping"),
        ({"hidden_activation": "silu"}, NotImplementedError, "hidden_activation 'silu'"),
    ],
)
def test_bad_configs_name_the_field(change, error, message):
    with pytest.raises(error, match=message):
        Gemma3TextConfig.from_dict({**BASE, **change})


def test_missing_fields_are_listed(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"model_type": "gemma3_text", "vocab_size": 10}))
    with pytest.raises(ValueError, match=r"config.json: missing field\(s\) \['hidden_size'"):
        Gemma3TextConfig.from_json(p)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Gemma3TextConfig.from_json(p)


@pytest.mark.parametrize("raw", [V4, V5], ids=["transformers-4", "transformers-5"])
def test_agrees_with_transformers(raw, tmp_path):
    transformers = pytest.importorskip("transformers", reason="the oracle extra is not installed")
    hf = transformers.Gemma3TextConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    hf.save_pretrained(tmp_path)
    ours = Gemma3TextConfig.from_json(tmp_path / "config.json")
    assert list(ours.layer_types) == list(hf.layer_types)
    for layer_type in (FULL, SLIDING):
        p = hf.rope_parameters[layer_type]
        assert ours.rope[layer_type].theta == p["rope_theta"]
        assert ours.rope[layer_type].factor == (p.get("factor", 1.0) if p["rope_type"] == "linear" else 1.0)
