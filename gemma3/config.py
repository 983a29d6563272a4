"""Gemma3 text configuration, read from a Hugging Face ``config.json``.

Two styles are found in the wild and both are read:

* transformers 4.x: ``rope_theta`` (global layers), ``rope_local_base_freq`` (sliding layers),
  ``rope_scaling`` (applies to global layers only), ``sliding_window_pattern`` (one global
  layer every N, default 6), ``layer_types`` sometimes;
* transformers 5.x: ``rope_parameters`` keyed by layer type and ``layer_types``.

A ``gemma3`` (image+text) config carries the text model in ``text_config``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

SLIDING, FULL = "sliding_attention", "full_attention"
DEFAULT_THETA = {FULL: 1_000_000.0, SLIDING: 10_000.0}
GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new")


# The config.json fields every decoder's shapes need.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def require_fields(d: dict, names, source: str) -> None:
    """Raise a ValueError naming every field of ``names`` that ``d`` lacks."""
    missing = [k for k in names if k not in d]
    if missing:
        raise ValueError(f"{source}: missing field(s) {missing}")


@dataclass(frozen=True)
class RopeParams:
    theta: float  # base of the inverse frequencies
    kind: str = "default"  # "default" or "linear"
    factor: float = 1.0  # linear scaling: positions divided by factor


@dataclass(frozen=True)
class Gemma3TextConfig:
    vocab_size: int  # embedding rows; the LM head is tied to them
    hidden_size: int  # residual stream width
    intermediate_size: int  # GeGLU MLP width
    num_hidden_layers: int
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # key/value heads (GQA when fewer than query heads, MQA at 1)
    head_dim: int
    max_position_embeddings: int
    sliding_window: int  # keys visible from a sliding layer: q - window < k <= q
    layer_types: tuple[str, ...]  # "sliding_attention" or "full_attention", one per layer
    rope: dict[str, RopeParams]  # per layer type
    query_pre_attn_scalar: float = 256.0  # attention scale = query_pre_attn_scalar ** -0.5
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = None  # logits = tanh(l / c) * c when set
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = 0
    raw: dict = field(default_factory=dict, compare=False, repr=False)  # config.json as read

    @property
    def attention_scale(self) -> float:
        return float(self.query_pre_attn_scalar) ** -0.5

    @property
    def embed_scale(self) -> float:
        return float(self.hidden_size) ** 0.5

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("raw")
        d["layer_types"] = list(self.layer_types)
        return d

    # ------------------------------------------------------------------ reading

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> Gemma3TextConfig:
        if d.get("model_type") == "gemma3" or "text_config" in d:
            text = dict(d.get("text_config") or {})
            return cls.from_dict(text, f"{source}: text_config")
        model_type = d.get("model_type", "gemma3_text")
        if model_type != "gemma3_text":
            raise ValueError(f"{source}: model_type {model_type!r} is not gemma3_text or gemma3")
        require_fields(d, SHAPE_FIELDS + ("num_key_value_heads",), source)
        for key, unsupported in (("attn_logit_softcapping", None), ("use_bidirectional_attention", False)):
            if d.get(key, unsupported) not in (unsupported, None):
                raise NotImplementedError(f"{source}: {key} = {d[key]!r} is not supported")
        act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in GELU_TANH:
            raise NotImplementedError(f"{source}: hidden_activation {act!r}; Gemma3 uses gelu_pytorch_tanh")
        n_layers = int(d["num_hidden_layers"])
        layer_types = d.get("layer_types")
        if layer_types is None:
            pattern = int(d.get("sliding_window_pattern") or 6)
            layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(n_layers)]
        layer_types = tuple(layer_types)
        if len(layer_types) != n_layers or set(layer_types) - {SLIDING, FULL}:
            raise ValueError(
                f"{source}: layer_types must list {n_layers} entries of {SLIDING!r} / {FULL!r}, "
                f"got {list(layer_types)}"
            )
        heads = int(d["num_attention_heads"])
        kv_heads = int(d["num_key_value_heads"])
        if heads % kv_heads:
            raise ValueError(
                f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )
        head_dim = int(d.get("head_dim") or int(d["hidden_size"]) // heads)
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=int(d.get("max_position_embeddings", 131072)),
            sliding_window=int(d.get("sliding_window") or 4096),
            layer_types=layer_types,
            rope=_rope(d, source),
            query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", head_dim)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            final_logit_softcapping=d.get("final_logit_softcapping"),
            attention_bias=bool(d.get("attention_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            bos_token_id=d.get("bos_token_id", 2),
            eos_token_id=d.get("eos_token_id", 1),
            pad_token_id=d.get("pad_token_id", 0),
            raw=dict(d),
        )

    @classmethod
    def from_json(cls, path) -> Gemma3TextConfig:
        return cls.from_dict(*read_json(path))


def read_json(path) -> tuple[dict, str]:
    """(the object in a JSON file, its path); a clear ValueError when it is not JSON."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            return json.load(f), path
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _rope(d: dict, source: str) -> dict[str, RopeParams]:
    params = d.get("rope_parameters")
    if params is not None and not (set(params) <= {FULL, SLIDING}):
        # A single rope_parameters dict (not per layer type) applies to global layers.
        params = {FULL: params}
    params = {k: dict(v) for k, v in (params or {}).items()}
    full = params.setdefault(FULL, {})
    sliding = params.setdefault(SLIDING, {})
    if d.get("rope_scaling"):  # 4.x: scaling applies to global layers
        full.update(d["rope_scaling"])
    full.setdefault("rope_theta", d.get("rope_theta", DEFAULT_THETA[FULL]))
    sliding.setdefault("rope_theta", d.get("rope_local_base_freq", DEFAULT_THETA[SLIDING]))
    out = {}
    for layer_type, p in ((FULL, full), (SLIDING, sliding)):
        kind = p.get("rope_type", p.get("type", "default"))
        if kind not in ("default", "linear"):
            raise NotImplementedError(f"{source}: rope_type {kind!r} for {layer_type} layers")
        factor = float(p.get("factor", 1.0)) if kind == "linear" else 1.0
        out[layer_type] = RopeParams(theta=float(p["rope_theta"]), kind=kind, factor=factor)
    return out
