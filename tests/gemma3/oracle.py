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


def tiny_random_model(seed=0, **overrides):
    """A random Gemma3ForCausalLM (fp32, eval mode) with random norm weights."""
    torch = pytest.importorskip("torch", reason="the oracle extra is not installed")
    import transformers

    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():  # norms start at zero: give them values so they matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    return model


def tiny_model(directory, seed=0, **overrides):
    """Save a random Gemma3ForCausalLM (fp32) into ``directory``; return the torch model."""
    model = tiny_random_model(seed, **overrides)
    model.save_pretrained(directory)
    return model


def tiny_image_model(directory, seed=0, vision=None, text=None, **overrides):
    """Save a random Gemma3ForConditionalGeneration (fp32) into ``directory``; return the torch
    model. ``vision`` / ``text`` override fields of the tiny vision / text configs, ``overrides``
    those of the Gemma3Config (e.g. ``mm_tokens_per_image``). Every vision and projector
    parameter gets random values (norm weights and biases start at constants)."""
    torch = pytest.importorskip("torch", reason="the oracle extra is not installed")
    import transformers

    vkw = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )
    vkw.update(vision or {})
    tkw = dict(num_hidden_layers=1, layer_types=["sliding_attention"])
    tkw.update(text or {})
    kw = dict(mm_tokens_per_image=4, boi_token_index=297, eoi_token_index=298, image_token_index=299)
    kw.update(overrides)
    config = transformers.Gemma3Config(
        text_config=tiny_config(**tkw).to_dict(),
        vision_config=transformers.SiglipVisionConfig(**vkw).to_dict(),
        **kw,
    )
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name:
                if "norm" in name:
                    p.normal_(0, 0.3)
            elif name.endswith("mm_soft_emb_norm.weight") or name.endswith(".bias"):
                p.normal_(0, 0.3)  # biases, and the Gemma RMSNorm's w (it scales by 1 + w)
            elif "layer_norm" in name or "layernorm" in name:
                p.normal_(1, 0.3)  # LayerNorm weights scale by w
            elif name.endswith("mm_input_projection_weight"):
                p.normal_(0, 0.2)
    model.save_pretrained(directory)
    return model
