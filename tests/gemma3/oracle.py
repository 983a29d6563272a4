"""Tiny random Gemma3 text models built in code with transformers (the oracle extra)."""

import pytest


def tiny_config(**overrides):
    transformers = pytest.importorskip("transformers", reason="the oracle extra is not installed")
    kw = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=16,
        rms_norm_eps=1e-6,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    kw.update(overrides)
    return transformers.Gemma3TextConfig(**kw)


def tiny_model(directory, seed=0, **overrides):
    """Save a random Gemma3ForCausalLM (fp32) into ``directory``; return the torch model."""
    torch = pytest.importorskip("torch", reason="the oracle extra is not installed")
    import transformers

    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():  # norms start at zero: give them values so they matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(directory)
    return model
