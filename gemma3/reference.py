"""A plain NumPy Gemma3 text model: the whole sequence at once, no cache, no NPU.

It reads top-down in dependency order (norm -> attention -> MLP -> block -> model) and is the
model-level reference that the NPU model and the transformers oracle are compared with.
"""

from __future__ import annotations

import numpy as np

from .config import FULL, SLIDING, Gemma3TextConfig


def rms_norm(x, w, eps):
    # Gemma scales by (1 + w), in fp32, then casts.
    x = x.astype(np.float32)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1.0 + w)


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def rope_cos_sin(positions, head_dim, theta, factor=1.0):
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim) / factor
    freqs = np.outer(positions, inv_freq)  # (seq, head_dim / 2)
    emb = np.concatenate([freqs, freqs], axis=-1)  # (seq, head_dim)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def attention_mask(positions, sliding_window, sliding, valid=None):
    """(seq, seq) bool: query i sees key j iff j <= i (by position) and, on sliding layers,
    j > i - window; ``valid`` (seq,) masks out padding keys."""
    q = positions[:, None]
    k = positions[None, :]
    visible = k <= q
    if sliding:
        visible &= k > q - sliding_window
    if valid is not None:
        visible &= valid[None, :]
    return visible


def attention(x, w, c: Gemma3TextConfig, layer, positions, valid):
    seq = x.shape[0]
    hq, hkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    q = (x @ w["q_proj"].T).reshape(seq, hq, hd)  # (seq, heads, head_dim)
    k = (x @ w["k_proj"].T).reshape(seq, hkv, hd)
    v = (x @ w["v_proj"].T).reshape(seq, hkv, hd)
    q = rms_norm(q, w["q_norm"], c.rms_norm_eps)
    k = rms_norm(k, w["k_norm"], c.rms_norm_eps)
    kind = c.layer_types[layer]
    rope = c.rope[kind]
    cos, sin = rope_cos_sin(positions, hd, rope.theta, rope.factor)
    q = q * cos[:, None] + rotate_half(q) * sin[:, None]
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    group = hq // hkv
    k = np.repeat(k, group, axis=1)  # (seq, heads, head_dim)
    v = np.repeat(v, group, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) * c.attention_scale  # (heads, seq, seq)
    mask = attention_mask(positions, c.sliding_window, kind == SLIDING, valid)
    scores = np.where(mask[None], scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    out = np.einsum("hqk,khd->qhd", p, v).reshape(seq, hq * hd)
    return out @ w["o_proj"].T


def mlp(x, w):
    return (gelu_tanh(x @ w["gate_proj"].T) * (x @ w["up_proj"].T)) @ w["down_proj"].T


def block(x, w, c, layer, positions, valid):
    eps = c.rms_norm_eps
    h = x + rms_norm(
        attention(rms_norm(x, w["input_layernorm"], eps), w, c, layer, positions, valid),
        w["post_attention_layernorm"],
        eps,
    )
    return h + rms_norm(
        mlp(rms_norm(h, w["pre_feedforward_layernorm"], eps), w), w["post_feedforward_layernorm"], eps
    )


def layer_weights(get, i):
    p = f"layers.{i}."
    names = [
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ]
    w = {n: get(p + n + ".weight") for n in names}
    for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
        w[n] = get(p + "self_attn." + n + ".weight")
    for n in ("gate_proj", "up_proj", "down_proj"):
        w[n] = get(p + "mlp." + n + ".weight")
    return w


def forward(c: Gemma3TextConfig, get, input_ids, attention_mask_row=None):
    """Logits (seq, vocab) for one sequence. ``get(name)`` returns a weight (names as in
    ``weights.expected_shapes``); ``attention_mask_row`` (seq,) 1 for tokens, 0 for padding."""
    valid = None if attention_mask_row is None else np.asarray(attention_mask_row).astype(bool)
    # Positions count real tokens only (left padding does not advance them).
    positions = np.arange(len(input_ids)) if valid is None else np.maximum(np.cumsum(valid) - 1, 0)
    emb = get("embed_tokens.weight")
    x = emb[np.asarray(input_ids)] * np.float32(c.embed_scale)
    for i in range(c.num_hidden_layers):
        x = block(x, layer_weights(get, i), c, i, positions, valid)
    x = rms_norm(x, get("norm.weight"), c.rms_norm_eps)
    logits = x @ emb.T
    if c.final_logit_softcapping:
        cap = c.final_logit_softcapping
        logits = np.tanh(logits / cap) * cap
    return logits


__all__ = ["forward", "rms_norm", "rope_cos_sin", "attention_mask", "FULL", "SLIDING"]
