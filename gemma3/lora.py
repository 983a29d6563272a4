"""Multi-LoRA, as Optimum RBLN compiles it: every adapter fixed at compile time, picked per row.

Configuration (Optimum RBLN's ``RBLNLoRAAdapterConfig`` / ``RBLNLoRAConfig``, its validation
and messages): an adapter is a peft directory (``adapter_config.json`` +
``adapter_model.safetensors``) or a hub id in the local Hugging Face cache; fields left unset
come from its ``adapter_config.json``. Id 0 is reserved for the base model (a zero adapter
injected there, named "base"); the ids are unique and contiguous; every adapter is padded
with zeros to ``max_lora_rank``.

On the chip (``LoRAOnNPU``): for each layer and each projection some adapter targets, the A
and B of all adapters live in DRAM as (N, in, R) and (N, out, R) (the scale ``alpha / r``,
or ``alpha / sqrt(r)`` with rslora, times ``scaling_factor``, folded into B), and the
library's ``lora`` kernel adds ``(x @ A[id]) @ B[id]^T`` to the projection's output, the id
of each batch row read by an indirect load. A projection no adapter targets costs nothing; a
layer whose MLP is targeted runs it unfused (gate, up, the GeGLU epilogue, down), so LoRA can
reach the intermediate activations.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np

from npu_kernels.lora import geglu_combine, lora
from npu_kernels.matmul import matmul

logger = logging.getLogger(__name__)

# peft module name -> (our short name, submodule of the decoder layer)
TARGETS = {
    "q_proj": ("q", "self_attn"),
    "k_proj": ("k", "self_attn"),
    "v_proj": ("v", "self_attn"),
    "o_proj": ("o", "self_attn"),
    "gate_proj": ("gate", "mlp"),
    "up_proj": ("up", "mlp"),
    "down_proj": ("down", "mlp"),
}
MLP_TARGETS = ("gate", "up", "down")
BASE_ADAPTER_PATH = "__reserved_base__"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# peft's key prefixes of the decoder layers: the text model, and the image+text model's language side
TEXT_PREFIX = "base_model.model.model.layers."
IMAGE_TEXT_PREFIX = "base_model.model.model.language_model.layers."


class RBLNLoRAAdapterConfig:
    """One adapter compiled into the model (Optimum RBLN's ``RBLNLoRAAdapterConfig``).

    ``lora_int_id`` (int, > 0; 0 is the base model), ``lora_name``, ``lora_path`` (a peft
    adapter directory or a hub id in the local Hugging Face cache); ``r``, ``lora_alpha``,
    ``target_modules``, ``bias`` ("none" only), ``use_rslora`` default to the adapter's
    ``adapter_config.json``; ``scaling_factor`` (default 1.0) multiplies the scale."""

    def __init__(
        self,
        lora_int_id: int,
        lora_name: str,
        lora_path,
        r: int | None = None,
        lora_alpha: float | None = None,
        target_modules: list[str] | None = None,
        bias: str | None = None,
        use_rslora: bool | None = None,
        scaling_factor: float | None = None,
    ):
        if lora_int_id is None:
            raise ValueError("lora_int_id cannot be None")
        if not isinstance(lora_int_id, int):
            raise ValueError(f"lora_int_id must be an integer, got {type(lora_int_id)}")
        self.lora_int_id = lora_int_id
        self.lora_name = lora_name
        self.lora_path = Path(lora_path)
        self._local = None
        # A saved config gives every field: it resolves the path only when the weights are read
        # (a compiled model reloads without its adapters' directories). Otherwise, as Optimum
        # RBLN, the path is resolved (and checked) now, for adapter_config.json's values.
        fields = (r, lora_alpha, target_modules, bias, use_rslora)
        adapter_config = self._load_adapter_config() if any(f is None for f in fields) else {}
        self.r = r if r is not None else adapter_config.get("r", 8)
        self.lora_alpha = lora_alpha if lora_alpha is not None else adapter_config.get("lora_alpha", 8.0)
        self.target_modules = (
            target_modules if target_modules is not None else adapter_config.get("target_modules", None)
        )
        self.bias = bias if bias is not None else adapter_config.get("bias", "none")
        if self.bias not in ["none"]:
            raise NotImplementedError("bias != 'none' is not supported yet")
        self.use_rslora = use_rslora if use_rslora is not None else adapter_config.get("use_rslora", False)
        self.scaling_factor = scaling_factor if scaling_factor is not None else 1.0
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha}")

    @property
    def local_adapter_path(self) -> Path:
        """The adapter's local directory (a hub id's snapshot in the Hugging Face cache)."""
        if self._local is None:
            self._local = resolve_adapter_path(self.lora_path)
        return self._local

    @property
    def layers_to_transform(self):
        """peft's ``layers_to_transform`` of adapter_config.json (None: every layer)."""
        return self._load_adapter_config(quiet=True).get("layers_to_transform")

    def _load_adapter_config(self, quiet: bool = False) -> dict:
        """adapter_config.json of the adapter (missing or unreadable: defaults, with a warning,
        as Optimum RBLN)."""
        path = self.local_adapter_path / ADAPTER_CONFIG
        if not path.exists():
            if not quiet:
                logger.warning(f"No adapter_config.json found at {path}, using default values")
            return {}
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            logger.warning(f"Failed to load adapter config from {path}: {e}, using default values")
            return {}

    @property
    def scale(self) -> float:
        """peft's scaling: ``alpha / r`` (``alpha / sqrt(r)`` with rslora), times ``scaling_factor``."""
        r = math.sqrt(self.r) if self.use_rslora else self.r
        return self.lora_alpha / r * self.scaling_factor

    def targets(self) -> list[str] | None:
        """Our short names of the targeted projections (None: whatever the weights hold)."""
        tm = self.target_modules
        if tm is None or (isinstance(tm, str) and tm not in TARGETS):
            return None  # peft's regex form (or none given): the tensors present decide
        names = [tm] if isinstance(tm, str) else list(tm)
        other = sorted(n for n in names if n not in TARGETS)
        if other:
            raise NotImplementedError(
                f"LoRA adapter {self.lora_name!r}: target_modules {other}: only the decoder projections "
                f"{list(TARGETS)} take adapters here"
            )
        return [TARGETS[n][0] for n in names]

    def to_dict(self) -> dict:
        return {
            "lora_int_id": self.lora_int_id,
            "lora_name": self.lora_name,
            "lora_path": str(self.lora_path),
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "target_modules": self.target_modules,
            "bias": self.bias,
            "use_rslora": self.use_rslora,
            "scaling_factor": self.scaling_factor,
        }

    _prepare_for_serialization = to_dict  # Optimum RBLN's name


class RBLNLoRABaseAdapterConfig(RBLNLoRAAdapterConfig):
    """The reserved adapter of id 0: the base model (targets nothing, so adds nothing)."""

    def __init__(
        self, lora_int_id: int = 0, lora_name: str = "base", lora_path=BASE_ADAPTER_PATH, r: int = 1
    ):
        if lora_int_id != 0:
            raise ValueError("RBLNLoRABaseAdapterConfig must have lora_int_id=0")
        self.lora_int_id, self.lora_name = 0, lora_name
        self.lora_path, self._local = Path(str(lora_path)), None
        self.r, self.lora_alpha, self.target_modules, self.bias = r, 1.0, [], "none"
        self.use_rslora, self.scaling_factor = False, 1.0


class RBLNLoRAConfig:
    """Every adapter compiled into the model (Optimum RBLN's ``RBLNLoRAConfig``): ``adapters``
    (dicts or ``RBLNLoRAAdapterConfig``s, ids from 1) and ``max_lora_rank`` (default: the
    largest rank; no smaller than any)."""

    def __init__(self, adapters, max_lora_rank: int | None = None):
        if not adapters:
            raise ValueError("adapters list cannot be empty")
        self.adapters: list[RBLNLoRAAdapterConfig] = []
        for adapter in adapters:
            if isinstance(adapter, dict):
                self.adapters.append(RBLNLoRAAdapterConfig(**adapter))
            elif isinstance(adapter, RBLNLoRAAdapterConfig):
                self.adapters.append(adapter)
            else:
                raise ValueError(f"Invalid adapter type: {type(adapter)}")
        if any(a.lora_int_id == 0 for a in self.adapters):
            raise ValueError(
                "lora_int_id=0 is reserved for base model and cannot be provided. Please renumber your "
                "adapters to start from 1."
            )
        self.adapters.insert(0, RBLNLoRABaseAdapterConfig())
        self.adapters.sort(key=lambda a: a.lora_int_id)
        ids = [a.lora_int_id for a in self.adapters]
        if len(ids) != len(set(ids)):
            raise ValueError("All adapter IDs must be unique")
        expected = list(range(len(self.adapters)))
        if ids != expected:
            raise ValueError(
                f"Adapter IDs must be contiguous and start from 0. Found {ids}, expected {expected}."
            )
        actual = max(a.r for a in self.adapters)
        self.max_lora_rank = actual if max_lora_rank is None else max_lora_rank
        if self.max_lora_rank < actual:
            raise ValueError(f"max_lora_rank ({self.max_lora_rank}) must be >= actual max rank ({actual})")

    @classmethod
    def create(cls, value) -> RBLNLoRAConfig | None:
        """The config from None, a dict of its fields or an instance."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls(**value)
        raise ValueError(f"lora_config must be a dict or RBLNLoRAConfig, got {type(value).__name__}")

    @property
    def num_adapters(self) -> int:
        return len(self.adapters)

    @property
    def adapter_ids(self) -> list[int]:
        return [a.lora_int_id for a in self.adapters]

    @property
    def adapter_names(self) -> list[str]:
        return [a.lora_name for a in self.adapters]

    def get_adapter_by_id(self, lora_int_id: int) -> RBLNLoRAAdapterConfig | None:
        return next((a for a in self.adapters if a.lora_int_id == lora_int_id), None)

    def get_adapter_by_name(self, lora_name: str) -> RBLNLoRAAdapterConfig | None:
        return next((a for a in self.adapters if a.lora_name == lora_name), None)

    def to_dict(self) -> dict:
        """The serialised form (the reserved base adapter is not written: it is injected again)."""
        return {
            "adapters": [a.to_dict() for a in self.adapters if a.lora_int_id != 0],
            "max_lora_rank": self.max_lora_rank,
        }

    _prepare_for_serialization = to_dict  # Optimum RBLN's name

    def __eq__(self, other):
        return isinstance(other, RBLNLoRAConfig) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return f"RBLNLoRAConfig({self.to_dict()})"


def resolve_adapter_path(path: Path) -> Path:
    """A local adapter directory, or a hub id's snapshot in the local Hugging Face cache."""
    if path.exists():
        return path
    if path.is_absolute():
        raise ValueError(f"LoRA adapter path does not exist: {path.as_posix()}")
    from .hf_compat import resolve_model_dir

    try:
        return Path(resolve_model_dir(str(path)))
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(
            f"Failed to download LoRA adapter '{path.as_posix()}' from HuggingFace Hub. Please check if the "
            f"model ID is correct or provide a valid local path. Error: {e}"
        ) from None


# ---------------------------------------------------------------------- weights


def _shapes(c) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection of a Gemma3 text config."""
    hd, hq, hkv, d, f = (
        c.head_dim,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.hidden_size,
        c.intermediate_size,
    )
    return {
        "q": (d, hq * hd),
        "k": (d, hkv * hd),
        "v": (d, hkv * hd),
        "o": (hq * hd, d),
        "gate": (d, f),
        "up": (d, f),
        "down": (f, d),
    }


def read_adapter(adapter: RBLNLoRAAdapterConfig, c, prefix: str) -> dict[tuple[int, str], tuple]:
    """{(layer, projection): (A (r, in), B (out, r))} of one adapter, every tensor name and shape
    checked against the model (config ``c``); ``prefix``: peft's key of the decoder layers."""
    from .weights import SafetensorsFile

    where = adapter.local_adapter_path
    path = where / ADAPTER_WEIGHTS
    if not path.is_file():
        pickles = [n for n in ("adapter_model.bin", "pytorch_model.bin") if (where / n).exists()]
        also = (
            f" ({', '.join(pickles)} is a pickle: not loaded, convert it to safetensors)" if pickles else ""
        )
        raise FileNotFoundError(f"LoRA adapter {adapter.lora_name!r}: no {ADAPTER_WEIGHTS} in {where}{also}")
    f = SafetensorsFile(os.fspath(path))
    shapes, by_key = _shapes(c), {}
    for name in f.tensors:
        key = _parse(name, prefix, c.num_hidden_layers)
        if key is None:
            raise ValueError(
                f"LoRA adapter {adapter.lora_name!r}: {path.name} holds {name!r}, which is not a LoRA "
                f"weight of a decoder projection ({prefix}N.self_attn|mlp.<proj>.lora_A|lora_B.weight)"
            )
        by_key.setdefault(key[:2], {})[key[2]] = f.float32(name)
    out = {}
    for (i, t), ab in sorted(by_key.items()):
        din, dout = shapes[t]
        name = f"{prefix}{i}.{dict((v[0], v[1]) for v in TARGETS.values())[t]}.{t}_proj"
        for part, want in (("lora_A", (adapter.r, din)), ("lora_B", (dout, adapter.r))):
            if part not in ab:
                raise ValueError(f"LoRA adapter {adapter.lora_name!r}: {name}.{part}.weight is missing")
            if ab[part].shape != want:
                raise ValueError(
                    f"LoRA adapter {adapter.lora_name!r}: {name}.{part}.weight is {ab[part].shape}, expected "
                    f"{want} (r={adapter.r}, in={din}, out={dout})"
                )
        out[(i, t)] = (ab["lora_A"], ab["lora_B"])
    targets = adapter.targets()
    if targets is not None:
        unknown = sorted({t for _, t in out} - set(targets))
        if unknown:
            raise ValueError(
                f"LoRA adapter {adapter.lora_name!r}: {path.name} holds weights of {unknown}, which "
                f"target_modules {adapter.target_modules} does not name"
            )
        layers = adapter.layers_to_transform
        layers = (
            range(c.num_hidden_layers) if layers is None else [layers] if isinstance(layers, int) else layers
        )
        for i in layers:
            for t in targets:
                if (i, t) not in out:
                    raise ValueError(
                        f"LoRA adapter {adapter.lora_name!r}: no weights for layer {i}'s {t}_proj, which "
                        f"target_modules {adapter.target_modules} names"
                    )
    return out


def _parse(name: str, prefix: str, layers: int):
    """(layer, projection, "lora_A" | "lora_B") of a peft tensor name, or None."""
    if not name.startswith(prefix):
        return None
    parts = name[len(prefix) :].split(".")
    if (
        len(parts) != 5
        or not parts[0].isdigit()
        or parts[4] != "weight"
        or parts[3] not in ("lora_A", "lora_B")
    ):
        return None
    i, module, proj = int(parts[0]), parts[1], parts[2]
    if i >= layers or proj not in TARGETS or TARGETS[proj][1] != module:
        return None
    return i, TARGETS[proj][0], parts[3]


def lora_device_weights(c, lora_config: RBLNLoRAConfig | None, image_text: bool = False) -> dict:
    """The device tensors of every adapter: ``{i}.lora_a.{t}`` (N, in, R) (A transposed) and
    ``{i}.lora_b.{t}`` (N, out, R) (B times the adapter's scale), for each layer i and
    projection t some adapter targets; adapters that do not target it hold zeros there."""
    if lora_config is None:
        return {}
    prefix = IMAGE_TEXT_PREFIX if image_text else TEXT_PREFIX
    shapes, n, rank = _shapes(c), lora_config.num_adapters, lora_config.max_lora_rank
    w = {}
    for adapter in lora_config.adapters:
        if adapter.lora_int_id == 0:
            continue
        for (i, t), (a, b) in read_adapter(adapter, c, prefix).items():
            din, dout = shapes[t]
            if f"{i}.lora_a.{t}" not in w:
                w[f"{i}.lora_a.{t}"] = np.zeros((n, din, rank), np.float32)
                w[f"{i}.lora_b.{t}"] = np.zeros((n, dout, rank), np.float32)
            w[f"{i}.lora_a.{t}"][adapter.lora_int_id, :, : adapter.r] = a.T
            w[f"{i}.lora_b.{t}"][adapter.lora_int_id, :, : adapter.r] = b * np.float32(adapter.scale)
    return w


# ---------------------------------------------------------------------- on the chip


class LoRAOnNPU:
    """The hook ``Gemma3OnNPU`` calls around its projections: adds each row's adapter.

    ``ids`` (batch,) int32: the adapter of each batch row (0: the base model); ``select(rows)``
    picks the ids of the rows the next prefill chunk or decode step runs."""

    def __init__(self, runtime, batch_size: int):
        self.rt = runtime
        self.ids = np.zeros(batch_size, np.int32)
        self.rows = self.ids[:1]

    def select(self, rows: slice) -> None:
        self.rows = np.ascontiguousarray(self.ids[rows])

    def _has(self, i: int, t: str) -> bool:
        return f"{i}.lora_a.{t}" in self.rt.weights

    def add(self, phase, i: int, t: str, x, y):
        """y (T, out) + each row group's adapter on x (T, in) for projection t of layer i."""
        if not self._has(i, t):
            return y
        w = self.rt.weights
        return self.rt._run(phase, lora, x, y, w[f"{i}.lora_a.{t}"], w[f"{i}.lora_b.{t}"], self.rows)

    def qkv(self, phase, i: int, h, qkv):
        """The fused q | k | v output with each part's adapter added."""
        c = self.rt.c
        widths = (c.num_attention_heads * c.head_dim, *(2 * [c.num_key_value_heads * c.head_dim]))
        start = 0
        for t, width in zip(("q", "k", "v"), widths):
            if self._has(i, t):
                qkv = np.array(qkv)
                qkv[:, start : start + width] = self.add(
                    phase, i, t, h, np.ascontiguousarray(qkv[:, start : start + width])
                )
            start += width
        return qkv

    def targets_mlp(self, i: int) -> bool:
        return any(self._has(i, t) for t in MLP_TARGETS)

    def mlp(self, phase, i: int, h):
        """Gemma's GeGLU MLP unfused, each projection with its adapter."""
        run, w = self.rt._run, self.rt.weights
        gate = self.add(phase, i, "gate", h, run(phase, matmul, h, w[f"{i}.gate"]))
        up = self.add(phase, i, "up", h, run(phase, matmul, h, w[f"{i}.up"]))
        act = run(phase, geglu_combine, gate, up)
        return self.add(phase, i, "down", act, run(phase, matmul, act, w[f"{i}.down"]))


def adapter_ids(lora_config: RBLNLoRAConfig | None, adapter_name, batch_size: int) -> np.ndarray:
    """The ids of ``set_adapter(adapter_name)``: a name for every row, or one name per row."""
    if lora_config is None:
        raise ValueError("Model is not configured with LoRA. Cannot set adapter.")
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    available = {a.lora_name: a.lora_int_id for a in lora_config.adapters}
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(f"Adapter(s) {missing} not found. Available adapters: {list(available.keys())}")
    ids = [available[n] for n in names]
    if isinstance(adapter_name, str):
        ids = ids * batch_size
    if len(ids) != batch_size:
        raise ValueError(f"lora_int_ids size mismatch: got {len(ids)}, expected {batch_size}.")
    return np.asarray(ids, np.int32)


__all__ = [
    "RBLNLoRAAdapterConfig",
    "RBLNLoRABaseAdapterConfig",
    "RBLNLoRAConfig",
    "LoRAOnNPU",
    "lora_device_weights",
    "adapter_ids",
    "TARGETS",
]
