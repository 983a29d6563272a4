"""Gemma3's image path, vision side: the SigLIP vision tower and the multimodal projector.

As Hugging Face transformers' ``Gemma3ForConditionalGeneration`` computes them
(``model.vision_tower`` a ``SiglipVisionModel``, ``model.multi_modal_projector`` a
``Gemma3MultiModalProjector``), for one image of ``num_channels x image_size x image_size``
normalised pixels (g = image_size // patch_size patches a side, P = g * g patches, D the
vision hidden size, H heads of hd = D / H, F the MLP width)::

    x = conv_p(pixels).flatten + b + pos                    patch embedding (P, D)
    per layer:                                              pre-LayerNorm blocks
        h = layer_norm1(x);  q, k, v = h @ Wq^T + bq, ...   biased projections, H heads
        x = x + out_proj(softmax(q k^T * hd^-0.5) v)         bidirectional over all P patches
        x = x + fc2(gelu_tanh(fc1(layer_norm2(x))))
    tower = post_layernorm(x)                               ``vision_tower(...).last_hidden_state``
    tokens = AvgPool2d(pool)(tower as a g x g grid)         T = mm_tokens_per_image tokens,
                                                            pool = g / sqrt(T)
    features = rmsnorm_gemma(tokens, mm_soft_emb_norm, eps) @ mm_input_projection_weight
                                                            (T, text hidden): ``get_image_features``

The projector's RMSNorm uses the *vision* config's ``layer_norm_eps`` (as transformers does),
not the text model's ``rms_norm_eps``. There is no SigLIP pooling head (``vision_use_head``
tensors, if a checkpoint has them, are ignored: Gemma3 does not use them).

On the NPU (``VisionTowerOnNPU``) every op is a library kernel: ``patch_embed`` (im2col by DMA,
conv bias and position embedding fused), ``layernorm``, ``linear`` (fused q|k|v projection with
its fused bias; out_proj), ``attention_prefill`` (the whole patch sequence as one query chunk
with an empty cache and one image block ``[0, P)``: every patch sees every patch, scale
hd^-0.5, MHA), ``siglip_mlp`` (fc1 + bias, gelu_tanh, fc2 + bias) and ``mm_projector``
(average pool, Gemma RMSNorm, projection). The residual adds happen on the host between kernels,
as in ``gemma3/runtime.py``. Images go one at a time: the shapes are static per image, as on the
real NPU, whatever the batch.

Checkpoint names (``expected_vision_shapes``): the tower's tensors under ``vision_tower.`` and
the projector's under ``multi_modal_projector.``, as transformers 5.x ``save_pretrained`` writes
them (``vision_tower.embeddings.patch_embedding.weight``, ...,
``multi_modal_projector.mm_input_projection_weight``). ``vision_checkpoint_names`` finds them in
a checkpoint under any of the layouts seen in the wild: the tower under ``vision_tower.``,
``vision_tower.vision_model.`` (transformers 4.x, the released checkpoints),
``model.vision_tower.`` or ``model.vision_tower.vision_model.``; the projector under
``multi_modal_projector.`` or ``model.multi_modal_projector.``.

Device layout (``vision_device_weights``, fp32 arrays; the NPU stores them in its dtype):

    patch_w (C*p*p, D)   Conv2d weight (D, C, p, p) flattened in (c, ky, kx) order, transposed
    patch_b (D,), pos (P, D)                    conv bias, position embedding table
    {i}.ln1_w, {i}.ln1_b, {i}.ln2_w, {i}.ln2_b  (D,) LayerNorm weights and biases of layer i
    {i}.qkv (D, 3D), {i}.qkv_b (3D,)            q | k | v projections fused, pre-transposed
    {i}.o (D, D), {i}.o_b (D,)                  out_proj, pre-transposed
    {i}.fc1 (D, F), {i}.fc1_b (F,), {i}.fc2 (F, D), {i}.fc2_b (D,)
    post_ln_w, post_ln_b (D,)
    mm_norm (D,), mm_proj (D, text hidden)      projector (the projection is stored (in, out))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields

import numpy as np

from npu_emulator import NPU, CycleReport, DeviceTensor, EmulatorError
from npu_kernels.attention_prefill import attention_prefill
from npu_kernels.matmul import linear
from npu_kernels.mlp import siglip_mlp
from npu_kernels.norms import layernorm
from npu_kernels.vision import mm_projector, patch_embed

from .config import GELU_TANH
from .runtime import PhaseCost
from .weights import check_tensors, shape_mismatch

# ============================================================================ configuration

# transformers' SiglipVisionConfig defaults: config.json files written by transformers 4.x
# list only the values that differ from these.
SIGLIP_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=224,
    patch_size=16,
    num_channels=3,
    layer_norm_eps=1e-6,
    hidden_act="gelu_pytorch_tanh",
)
MM_TOKENS_DEFAULT = 256  # Gemma3Config.mm_tokens_per_image


def _positive_int(value, field: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{source}: {field} must be a positive integer, got {value!r}")
    return int(value)


def _square_size(value, field: str, source: str) -> int:
    """image_size / patch_size: an int, or a [h, w] pair with h == w (square images only)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(
                f"{source}: {field} {list(value)} is not square: only square images and patches are supported"
            )
        value = value[0]
    return _positive_int(value, field, source)


INT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels")


@dataclass(frozen=True)
class SiglipVisionConfig:
    """The SigLIP vision tower's shape (``vision_config`` of a Gemma3 config.json). Validated
    (and normalised: a square ``[s, s]`` size becomes ``s``) at construction."""

    hidden_size: int  # D, the width of the patch sequence
    intermediate_size: int  # F, the MLP width
    num_hidden_layers: int
    num_attention_heads: int  # H (MHA): head_dim = D / H
    image_size: int  # square images of image_size x image_size pixels
    patch_size: int  # the convolution's kernel and stride
    num_channels: int = 3
    layer_norm_eps: float = 1e-6  # LayerNorms, and the projector's RMSNorm
    hidden_act: str = "gelu_pytorch_tanh"  # must be a tanh-approximated GELU

    def __post_init__(self):
        src = "vision_config"
        norm = {f: _positive_int(getattr(self, f), f, src) for f in INT_FIELDS}
        norm["image_size"] = _square_size(self.image_size, "image_size", src)
        norm["patch_size"] = _square_size(self.patch_size, "patch_size", src)
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"{src}: layer_norm_eps must be a positive number, got {eps!r}")
        norm["layer_norm_eps"] = float(eps)
        for f, value in norm.items():
            object.__setattr__(self, f, value)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"{src}: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"{src}: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.hidden_act not in GELU_TANH:
            raise NotImplementedError(
                f"{src}: hidden_act {self.hidden_act!r} is not supported; the SigLIP MLP kernel "
                f"applies a tanh-approximated GELU ({', '.join(GELU_TANH)})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2

    @property
    def attention_scale(self) -> float:
        return float(self.head_dim) ** -0.5

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping, source: str = "vision_config") -> SiglipVisionConfig:
        """From a ``vision_config`` dict (or a whole Gemma3 config holding one); missing fields
        take transformers' SiglipVisionConfig defaults, unrelated keys are ignored."""
        if "vision_config" in d:
            return cls.from_dict(d["vision_config"] or {}, f"{source}: vision_config")
        model_type = d.get("model_type", "siglip_vision_model")
        if model_type != "siglip_vision_model":
            raise ValueError(f"{source}: model_type {model_type!r} is not siglip_vision_model")
        kw = {}
        for f in fields(cls):
            value = d.get(f.name)
            kw[f.name] = SIGLIP_DEFAULTS[f.name] if value is None else value
        try:
            return cls(**kw)
        except (ValueError, NotImplementedError) as e:
            raise type(e)(str(e).replace("vision_config:", f"{source}:", 1)) from None


@dataclass(frozen=True)
class Gemma3VisionSpec:
    """Everything the vision side needs: the tower, and the projector into the text model."""

    vision: SiglipVisionConfig
    text_hidden_size: int  # the projection's output width (the text model's hidden size)
    mm_tokens_per_image: int = MM_TOKENS_DEFAULT  # T, a perfect square

    def __post_init__(self):
        t = _positive_int(self.mm_tokens_per_image, "mm_tokens_per_image", "config")
        _positive_int(self.text_hidden_size, "text_hidden_size", "config")
        side = math.isqrt(t)
        if side * side != t:
            raise ValueError(f"config: mm_tokens_per_image {t} is not a perfect square")
        g = self.vision.patches_per_side
        if g % side:
            raise ValueError(
                f"config: mm_tokens_per_image {t} ({side} x {side}) does not divide the "
                f"{g} x {g} patch grid (image_size {self.vision.image_size} / patch_size "
                f"{self.vision.patch_size}) into whole pooling windows"
            )

    @property
    def tokens_per_side(self) -> int:
        return math.isqrt(self.mm_tokens_per_image)

    @property
    def pool(self) -> int:
        """The average pool's kernel (and stride): patches per token a side."""
        return self.vision.patches_per_side // self.tokens_per_side

    @property
    def projector_eps(self) -> float:
        """mm_soft_emb_norm's eps: the vision config's layer_norm_eps (as transformers)."""
        return self.vision.layer_norm_eps

    def to_dict(self) -> dict:
        return {
            "vision_config": self.vision.to_dict(),
            "mm_tokens_per_image": self.mm_tokens_per_image,
            "text_hidden_size": self.text_hidden_size,
        }

    @classmethod
    def from_dict(cls, d: Mapping, source: str = "config") -> Gemma3VisionSpec:
        """From a Gemma3 (image+text) config.json dict, or from ``to_dict``'s output."""
        if "vision_config" not in d:
            raise ValueError(f"{source}: no vision_config (not an image+text Gemma3 config)")
        vision = SiglipVisionConfig.from_dict(d["vision_config"] or {}, f"{source}: vision_config")
        text_hidden = d.get("text_hidden_size")
        if text_hidden is None:
            text_hidden = (d.get("text_config") or {}).get("hidden_size")
        if text_hidden is None:
            raise ValueError(f"{source}: text_config.hidden_size is missing (the projection's output width)")
        tokens = d.get("mm_tokens_per_image")
        try:
            return cls(
                vision=vision,
                text_hidden_size=_positive_int(text_hidden, "text_config.hidden_size", source),
                mm_tokens_per_image=MM_TOKENS_DEFAULT if tokens is None else tokens,
            )
        except ValueError as e:
            raise ValueError(str(e).replace("config:", f"{source}:", 1)) from None


def _vision_of(config) -> SiglipVisionConfig:
    return config.vision if isinstance(config, Gemma3VisionSpec) else config


# ============================================================================ weights

TOWER = "vision_tower."
PROJECTOR = "multi_modal_projector."
# Where the tower's and the projector's tensors appear, most specific first.
TOWER_PREFIXES = (
    "vision_tower.vision_model.",  # transformers 4.x (the released Gemma3 checkpoints)
    "model.vision_tower.vision_model.",
    "vision_tower.",  # transformers 5.x save_pretrained
    "model.vision_tower.",  # transformers 5.x module names
)
PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")


def expected_vision_shapes(spec: Gemma3VisionSpec) -> dict[str, tuple]:
    """Name -> shape of every tensor the vision side needs, in checkpoint layout; names as
    transformers 5.x writes them (``vision_tower.`` + the SiglipVisionModel name without
    ``vision_model.``, ``multi_modal_projector.`` + the projector's)."""
    v = spec.vision
    d, f, p, c = v.hidden_size, v.intermediate_size, v.patch_size, v.num_channels
    t = TOWER
    shapes = {
        t + "embeddings.patch_embedding.weight": (d, c, p, p),
        t + "embeddings.patch_embedding.bias": (d,),
        t + "embeddings.position_embedding.weight": (v.num_patches, d),
    }
    for i in range(v.num_hidden_layers):
        q = f"{t}encoder.layers.{i}."
        for n in ("layer_norm1", "layer_norm2"):
            shapes[q + n + ".weight"] = (d,)
            shapes[q + n + ".bias"] = (d,)
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[q + f"self_attn.{n}.weight"] = (d, d)
            shapes[q + f"self_attn.{n}.bias"] = (d,)
        shapes[q + "mlp.fc1.weight"] = (f, d)
        shapes[q + "mlp.fc1.bias"] = (f,)
        shapes[q + "mlp.fc2.weight"] = (d, f)
        shapes[q + "mlp.fc2.bias"] = (d,)
    shapes[t + "post_layernorm.weight"] = (d,)
    shapes[t + "post_layernorm.bias"] = (d,)
    shapes[PROJECTOR + "mm_input_projection_weight"] = (d, spec.text_hidden_size)
    shapes[PROJECTOR + "mm_soft_emb_norm.weight"] = (d,)
    return shapes


def _names_of(ckpt) -> list[str]:
    """Tensor names of a ``Checkpoint`` (``names()``) or a ``SafetensorsFile`` (``tensors``)."""
    return list(ckpt.names()) if hasattr(ckpt, "names") else list(ckpt.tensors)


def vision_checkpoint_names(ckpt, spec: Gemma3VisionSpec) -> dict[str, str]:
    """Map every expected vision tensor (``expected_vision_shapes``) to its name in ``ckpt``
    (a ``Checkpoint`` or ``SafetensorsFile``), checking shapes. Raises one CheckpointError
    listing the missing and mis-shaped tensors."""
    names = set(_names_of(ckpt))
    expected = expected_vision_shapes(spec)
    where = getattr(ckpt, "directory", None) or getattr(ckpt, "path", "checkpoint")

    def prefix_for(prefixes, probe, default):
        return next((p for p in prefixes if p + probe in names), default)

    tower = prefix_for(TOWER_PREFIXES, "embeddings.patch_embedding.weight", TOWER)
    proj = prefix_for(PROJECTOR_PREFIXES, "mm_input_projection_weight", PROJECTOR)
    found, missing, misshaped = {}, [], []
    for short, want in expected.items():
        name = tower + short[len(TOWER) :] if short.startswith(TOWER) else proj + short[len(PROJECTOR) :]
        if name not in names:
            missing.append(name)
            continue
        if mismatch := shape_mismatch(name, ckpt.shape(name), want):
            misshaped.append(mismatch)
        found[short] = name
    check_tensors(
        f"{where}: the vision tower / projector tensors do not match the config", missing, [], misshaped
    )
    return found


def vision_device_weights(config, get: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
    """Checkpoint tensors -> device layout (module docstring), fp32. ``config`` is a
    ``Gemma3VisionSpec`` (or a ``SiglipVisionConfig``); ``get(name)`` returns the tensor named
    as in ``expected_vision_shapes`` (``vision_tower.*`` / ``multi_modal_projector.*``)."""
    v = _vision_of(config)

    def g(name):
        return np.asarray(get(name), np.float32)

    def t(name):  # nn.Linear (out, in) -> (in, out)
        return np.ascontiguousarray(g(name).T)

    e = TOWER + "embeddings."
    conv = g(e + "patch_embedding.weight")
    w = {
        "patch_w": np.ascontiguousarray(conv.reshape(conv.shape[0], -1).T),  # (C*p*p, D)
        "patch_b": g(e + "patch_embedding.bias"),
        "pos": g(e + "position_embedding.weight"),
    }
    for i in range(v.num_hidden_layers):
        p = f"{TOWER}encoder.layers.{i}."
        a = p + "self_attn."
        w[f"{i}.ln1_w"], w[f"{i}.ln1_b"] = g(p + "layer_norm1.weight"), g(p + "layer_norm1.bias")
        w[f"{i}.qkv"] = np.ascontiguousarray(
            np.concatenate([g(a + f"{n}_proj.weight") for n in "qkv"], axis=0).T
        )  # (D, 3D): columns q | k | v
        w[f"{i}.qkv_b"] = np.concatenate([g(a + f"{n}_proj.bias") for n in "qkv"])
        w[f"{i}.o"], w[f"{i}.o_b"] = t(a + "out_proj.weight"), g(a + "out_proj.bias")
        w[f"{i}.ln2_w"], w[f"{i}.ln2_b"] = g(p + "layer_norm2.weight"), g(p + "layer_norm2.bias")
        w[f"{i}.fc1"], w[f"{i}.fc1_b"] = t(p + "mlp.fc1.weight"), g(p + "mlp.fc1.bias")
        w[f"{i}.fc2"], w[f"{i}.fc2_b"] = t(p + "mlp.fc2.weight"), g(p + "mlp.fc2.bias")
    w["post_ln_w"] = g(TOWER + "post_layernorm.weight")
    w["post_ln_b"] = g(TOWER + "post_layernorm.bias")
    w["mm_norm"] = g(PROJECTOR + "mm_soft_emb_norm.weight")
    w["mm_proj"] = np.ascontiguousarray(g(PROJECTOR + "mm_input_projection_weight"))  # (D, text hidden)
    return w


def load_vision_weights(ckpt, spec: Gemma3VisionSpec) -> dict[str, np.ndarray]:
    """Device-layout weights straight from a ``Checkpoint`` or ``SafetensorsFile``."""
    names = vision_checkpoint_names(ckpt, spec)
    return vision_device_weights(spec, lambda n: ckpt.float32(names[n]))


# ============================================================================ NumPy reference


def _gelu_tanh(z):
    return 0.5 * z * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))


def _layer_norm(x, w, b, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def vision_reference(spec: Gemma3VisionSpec, weights, pixel_values) -> tuple[np.ndarray, np.ndarray]:
    """Plain float64 NumPy on checkpoint-layout weights (``weights``: a mapping or a callable,
    names as ``expected_vision_shapes``); pixel_values (N, C, H, W).

    Returns (the tower's output (N, P, D), the projected image features (N, T, text hidden))."""
    v = spec.vision

    def g(name):
        return np.asarray(weights(name) if callable(weights) else weights[name], np.float64)

    x = np.asarray(pixel_values, np.float64)
    if x.ndim != 4 or x.shape[1:] != (v.num_channels, v.image_size, v.image_size):
        raise ValueError(
            f"pixel_values {x.shape} must be (N, {v.num_channels}, {v.image_size}, {v.image_size})"
        )
    n = x.shape[0]
    c, p, gs, d = v.num_channels, v.patch_size, v.patches_per_side, v.hidden_size
    patches = x.reshape(n, c, gs, p, gs, p)
    conv = g(TOWER + "embeddings.patch_embedding.weight")  # (D, C, p, p)
    hs = np.einsum("ncyaxb,dcab->nyxd", patches, conv).reshape(n, gs * gs, d)
    hs = hs + g(TOWER + "embeddings.patch_embedding.bias") + g(TOWER + "embeddings.position_embedding.weight")
    heads, hd = v.num_attention_heads, v.head_dim
    for i in range(v.num_hidden_layers):
        pre = f"{TOWER}encoder.layers.{i}."

        def lin(z, name, pre=pre):
            return z @ g(pre + name + ".weight").T + g(pre + name + ".bias")

        z = _layer_norm(hs, g(pre + "layer_norm1.weight"), g(pre + "layer_norm1.bias"), v.layer_norm_eps)
        q, k, val = (lin(z, f"self_attn.{m}_proj").reshape(n, -1, heads, hd) for m in "qkv")
        s = np.einsum("nqhe,nkhe->nhqk", q, k) * hd**-0.5
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        s /= s.sum(axis=-1, keepdims=True)
        a = np.einsum("nhqk,nkhe->nqhe", s, val).reshape(n, -1, d)
        hs = hs + lin(a, "self_attn.out_proj")
        z = _layer_norm(hs, g(pre + "layer_norm2.weight"), g(pre + "layer_norm2.bias"), v.layer_norm_eps)
        hs = hs + lin(_gelu_tanh(lin(z, "mlp.fc1")), "mlp.fc2")
    tower = _layer_norm(
        hs, g(TOWER + "post_layernorm.weight"), g(TOWER + "post_layernorm.bias"), v.layer_norm_eps
    )
    ts, pool = spec.tokens_per_side, spec.pool
    tokens = tower.reshape(n, ts, pool, ts, pool, d).mean(axis=(2, 4)).reshape(n, ts * ts, d)
    rms = np.sqrt((tokens**2).mean(axis=-1, keepdims=True) + spec.projector_eps)
    normed = tokens / rms * (1.0 + g(PROJECTOR + "mm_soft_emb_norm.weight"))
    return tower, normed @ g(PROJECTOR + "mm_input_projection_weight")


# ============================================================================ on the NPU


class VisionTowerOnNPU:
    """The vision tower and projector of one model on an NPU, every op a library kernel.

    ``weights``: device layout (``vision_device_weights``), NumPy arrays (uploaded to the NPU's
    DRAM here) or DeviceTensors already on ``npu``. The reports of every kernel run collect in
    ``self.cost`` (a ``PhaseCost``); ``report()`` totals them as "image encoding"."""

    PHASE = "image encoding"

    def __init__(self, spec: Gemma3VisionSpec, npu: NPU, weights: Mapping):
        self.spec = spec
        self.npu = npu
        v = spec.vision
        shapes = device_weight_shapes(spec)
        missing = sorted(set(shapes) - set(weights))
        if missing:
            raise ValueError(f"VisionTowerOnNPU: device weights missing {missing[:20]}")
        self.weights: dict[str, DeviceTensor] = {}
        for name, shape in shapes.items():
            a = weights[name]
            if tuple(a.shape) != shape:
                raise ValueError(
                    f"VisionTowerOnNPU: device weight {name!r} is {tuple(a.shape)}, expected {shape}"
                )
            if isinstance(a, DeviceTensor):
                if a.npu is not npu:
                    raise ValueError(f"VisionTowerOnNPU: device weight {name!r} lives on another NPU")
                self.weights[name] = a
            else:
                self.weights[name] = npu.to_device(np.asarray(a, np.float32), name=f"vision.{name}")
        # The attention's KV cache: empty (no earlier positions; every key is in the chunk).
        empty = np.zeros((1, v.num_attention_heads, 0, v.head_dim), np.float32)
        self.empty_cache = npu.to_device(empty, name="vision.empty_kv")
        self.consts = kernel_consts(spec)
        self.cost = PhaseCost()

    # ------------------------------------------------------------------ kernels

    def _run(self, kernel, *inputs, **consts):
        try:
            out, report = self.npu.run(kernel, *inputs, **consts)
        except EmulatorError as e:
            shapes = ", ".join(str(tuple(x.shape)) for x in inputs)
            raise type(e)(f"kernel {kernel.name} on inputs {shapes}: {e}") from None
        self.cost.add(report)
        return out

    def _check_pixels(self, pixel_values) -> np.ndarray:
        v = self.spec.vision
        x = np.asarray(pixel_values, np.float32)
        want = (v.num_channels, v.image_size, v.image_size)
        if x.ndim != 4 or x.shape[1:] != want:
            raise ValueError(f"pixel_values {x.shape} must be (N, {want[0]}, {want[1]}, {want[2]})")
        return x

    def tower_image(self, pixels: np.ndarray) -> np.ndarray:
        """One image (C, H, W) -> the tower's output (P, D)."""
        v, w, c = self.spec.vision, self.weights, self.consts
        p, d, heads, hd = v.num_patches, v.hidden_size, v.num_attention_heads, v.head_dim
        x = self._run(patch_embed, pixels, w["patch_w"], w["patch_b"], w["pos"], **c["patch"])
        cache = self.empty_cache
        for i in range(v.num_hidden_layers):
            h = self._run(layernorm, x, w[f"{i}.ln1_w"], w[f"{i}.ln1_b"], **c["ln"])
            qkv = self._run(linear, h, w[f"{i}.qkv"], w[f"{i}.qkv_b"])  # (P, 3D): q | k | v
            q, k, val = (
                np.ascontiguousarray(qkv[:, j * d : (j + 1) * d].reshape(p, heads, hd)) for j in range(3)
            )
            a = self._run(attention_prefill, q, k, val, cache, cache, **c["attn"])
            x = x + self._run(linear, a.reshape(p, d), w[f"{i}.o"], w[f"{i}.o_b"])
            h = self._run(layernorm, x, w[f"{i}.ln2_w"], w[f"{i}.ln2_b"], **c["ln"])
            x = x + self._run(siglip_mlp, h, w[f"{i}.fc1"], w[f"{i}.fc1_b"], w[f"{i}.fc2"], w[f"{i}.fc2_b"])
        return self._run(layernorm, x, w["post_ln_w"], w["post_ln_b"], **c["ln"])

    def project_image(self, hidden: np.ndarray) -> np.ndarray:
        """One image's tower output (P, D) -> image features (T, text hidden)."""
        w = self.weights
        return self._run(mm_projector, hidden, w["mm_norm"], w["mm_proj"], **self.consts["proj"])

    def vision_tower(self, pixel_values) -> np.ndarray:
        """pixel_values (N, C, H, W) -> ``vision_tower(...).last_hidden_state`` (N, P, D)."""
        x = self._check_pixels(pixel_values)
        return np.stack([self.tower_image(img) for img in x]).astype(np.float32, copy=False)

    def project(self, hidden) -> np.ndarray:
        """The tower's output (N, P, D) -> image features (N, T, text hidden)."""
        v = self.spec.vision
        hidden = np.asarray(hidden, np.float32)
        if hidden.ndim != 3 or hidden.shape[1:] != (v.num_patches, v.hidden_size):
            raise ValueError(f"hidden {hidden.shape} must be (N, {v.num_patches}, {v.hidden_size})")
        return np.stack([self.project_image(h) for h in hidden]).astype(np.float32, copy=False)

    def encode(self, pixel_values) -> np.ndarray:
        """pixel_values (N, C, H, W) -> image features (N, mm_tokens_per_image, text hidden),
        as ``get_image_features``; one image after another."""
        x = self._check_pixels(pixel_values)
        return np.stack([self.project_image(self.tower_image(img)) for img in x]).astype(
            np.float32, copy=False
        )

    # ------------------------------------------------------------------ compile / costs

    def signatures(self) -> list[tuple]:
        """(kernel, input (shape, dtype) signature, consts) of every distinct kernel call one
        image makes (the layers share theirs)."""
        seen, unique = set(), []
        for kernel, signature, consts in image_kernel_calls(self.spec, self.npu.dtype):
            key = (kernel.name, tuple(signature), tuple(sorted(consts.items())))
            if key not in seen:
                seen.add(key)
                unique.append((kernel, signature, consts))
        return unique

    def plan_all(self) -> None:
        """Compile: plan every kernel of the image path at its static shapes (no values) and
        check that each fits SRAM; later runs reuse the plans."""
        for kernel, signature, consts in self.signatures():
            try:
                self.npu.plan(kernel, signature, consts)
            except Exception as e:
                shapes = ", ".join(f"{tuple(s)} {d}" for s, d in signature)
                raise type(e)(f"kernel {kernel.name} at ({shapes}) with {consts}: {e}") from None

    def report(self) -> CycleReport | None:
        """Every kernel run since the last ``reset``, added up as "image encoding"."""
        return self.cost.total(self.PHASE)

    @property
    def reports(self) -> list[CycleReport]:
        return self.cost.reports

    def reset(self) -> None:
        self.cost.reports.clear()


def kernel_consts(spec: Gemma3VisionSpec) -> dict[str, dict]:
    """The compile-time constants of the image path's kernels, by role."""
    v = spec.vision
    return {
        "patch": dict(patch=v.patch_size),
        "ln": dict(eps=v.layer_norm_eps),
        "attn": dict(q_start=0, scale=v.attention_scale, image_blocks=((0, v.num_patches),)),
        "proj": dict(pool=spec.pool, eps=spec.projector_eps),
    }


def image_kernel_calls(spec: Gemma3VisionSpec, dtype: str = "bf16") -> list[tuple]:
    """(kernel, input (shape, dtype) signature, consts) of every kernel call encoding one image
    makes, in order, every tensor in the device dtype ``dtype``: what ``VisionTowerOnNPU`` runs,
    from the shapes alone (no weights needed; ``npu.plan`` each to cost it)."""
    v, c, w = spec.vision, kernel_consts(spec), device_weight_shapes(spec)
    p, d, heads, hd = v.num_patches, v.hidden_size, v.num_attention_heads, v.head_dim

    def sig(*items):
        return [(tuple(w[x]) if isinstance(x, str) else tuple(x), dtype) for x in items]

    rows, heads_shape = (p, d), (p, heads, hd)
    cache = (1, heads, 0, hd)  # the attention's KV cache: empty, every key is in the chunk
    out = [
        (
            patch_embed,
            sig((v.num_channels, v.image_size, v.image_size), "patch_w", "patch_b", "pos"),
            c["patch"],
        )
    ]
    for i in range(v.num_hidden_layers):
        out += [
            (layernorm, sig(rows, f"{i}.ln1_w", f"{i}.ln1_b"), c["ln"]),
            (linear, sig(rows, f"{i}.qkv", f"{i}.qkv_b"), {}),
            (attention_prefill, sig(heads_shape, heads_shape, heads_shape, cache, cache), c["attn"]),
            (linear, sig(rows, f"{i}.o", f"{i}.o_b"), {}),
            (layernorm, sig(rows, f"{i}.ln2_w", f"{i}.ln2_b"), c["ln"]),
            (siglip_mlp, sig(rows, f"{i}.fc1", f"{i}.fc1_b", f"{i}.fc2", f"{i}.fc2_b"), {}),
        ]
    out.append((layernorm, sig(rows, "post_ln_w", "post_ln_b"), c["ln"]))
    out.append((mm_projector, sig(rows, "mm_norm", "mm_proj"), c["proj"]))
    return out


def device_weight_shapes(spec: Gemma3VisionSpec) -> dict[str, tuple]:
    """Name -> shape of every device-layout weight (``vision_device_weights``)."""
    v = spec.vision
    d, f, k = v.hidden_size, v.intermediate_size, v.num_channels * v.patch_size**2
    s = {"patch_w": (k, d), "patch_b": (d,), "pos": (v.num_patches, d)}
    for i in range(v.num_hidden_layers):
        s.update(
            {
                f"{i}.ln1_w": (d,),
                f"{i}.ln1_b": (d,),
                f"{i}.qkv": (d, 3 * d),
                f"{i}.qkv_b": (3 * d,),
                f"{i}.o": (d, d),
                f"{i}.o_b": (d,),
                f"{i}.ln2_w": (d,),
                f"{i}.ln2_b": (d,),
                f"{i}.fc1": (d, f),
                f"{i}.fc1_b": (f,),
                f"{i}.fc2": (f, d),
                f"{i}.fc2_b": (d,),
            }
        )
    s.update({"post_ln_w": (d,), "post_ln_b": (d,), "mm_norm": (d,), "mm_proj": (d, spec.text_hidden_size)})
    return s


__all__ = [
    "SiglipVisionConfig",
    "Gemma3VisionSpec",
    "expected_vision_shapes",
    "device_weight_shapes",
    "image_kernel_calls",
    "kernel_consts",
    "vision_checkpoint_names",
    "vision_device_weights",
    "load_vision_weights",
    "vision_reference",
    "VisionTowerOnNPU",
    "TOWER_PREFIXES",
    "PROJECTOR_PREFIXES",
]
