"""Compile-time configuration of a model on the NPU, as Optimum RBLN's ``RBLN*Config`` classes.

Fields are checked at construction and a bad one raises ``ValueError`` naming the field and
the value; unknown fields raise too. ``load(path, **kwargs)`` reads ``rbln_config.json`` and
lets ``rbln_``-prefixed kwargs (``rbln_max_seq_len=512``) override saved values.

The image+text model's config (``NPUGemma3ForConditionalGenerationConfig``) holds two
sub-configs, ``vision_tower`` and ``language_model``, as dicts or config objects; overriding
one with a dict (``rbln_language_model={"max_seq_len": 1024}``) updates it field by field.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, dataclass, field, fields

from npu_emulator import NPUConfig, get_preset

from .atomic import new_file

CONFIG_NAME = "rbln_config.json"


def strip_rbln(kwargs: dict) -> tuple[dict, dict]:
    """Split kwargs into (config fields from ``rbln_*`` keys, everything else)."""
    ours = {k[len("rbln_") :]: v for k, v in kwargs.items() if k.startswith("rbln_")}
    rest = {k: v for k, v in kwargs.items() if not k.startswith("rbln_")}
    return ours, rest


def _positive_int(name, value, *, allow_none=True):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class NPUModelConfig:
    """Fields every model shares; subclasses add their own."""

    batch_size: int = 1  # sequences decoded together (the compiled decode batch)
    npu: str | NPUConfig = "atom"  # chip preset name or an NPUConfig
    mode: str = "fast"  # "fast" (whole-operator math, cached schedules) or "tile" (every instruction)
    numerics: str = "bf16"  # "bf16" (device rounding) or "fp32" (reference numerics)

    def __post_init__(self):
        _positive_int("batch_size", self.batch_size, allow_none=False)
        if isinstance(self.npu, dict):
            self.npu = NPUConfig.from_dict(self.npu)
        try:
            get_preset(self.npu)
        except ValueError as e:
            raise ValueError(f"npu: {e}") from None
        if self.mode not in ("fast", "tile"):
            raise ValueError(f"mode must be 'fast' or 'tile', got {self.mode!r}")
        if self.numerics not in ("bf16", "fp32"):
            raise ValueError(f"numerics must be 'bf16' or 'fp32', got {self.numerics!r}")

    @property
    def npu_config(self) -> NPUConfig:
        return get_preset(self.npu)

    @classmethod
    def from_any(cls, value=None, **overrides):
        """A config from None, a dict or an instance, with field overrides applied."""
        return cls.create({**cls._as_dict(value), **overrides})

    @classmethod
    def _as_dict(cls, value) -> dict:
        """The fields of None, a dict or an instance, as a dict."""
        if value is None:
            return {}
        if isinstance(value, cls):
            return value.to_dict()
        if not isinstance(value, dict):
            raise TypeError(f"rbln_config must be a dict or {cls.__name__}, got {type(value).__name__}")
        return value

    @classmethod
    def create(cls, d: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {unknown}; fields: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if isinstance(d["npu"], NPUConfig):
            d["npu"] = d["npu"].to_dict()
        return d

    def save(self, directory) -> str:
        path = os.path.join(os.fspath(directory), CONFIG_NAME)
        doc = {"class": type(self).__name__, **self.to_dict()}
        with new_file(path, suffix=".json") as tmp, open(tmp, "w") as f:
            json.dump(doc, f, indent=2)
        return path

    @classmethod
    def load(cls, path, **kwargs):
        """Read ``rbln_config.json`` (a file or the directory holding it); ``rbln_*`` kwargs
        override saved values."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
        try:
            with open(path) as f:
                doc = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no {CONFIG_NAME}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        saved_class = doc.pop("class", cls.__name__)
        if saved_class not in (cls.__name__, cls.__name__.replace("NPU", "RBLN")):
            raise ValueError(f"{path} holds a {saved_class}, not a {cls.__name__}")
        overrides, rest = strip_rbln(kwargs)
        unknown = sorted(rest)
        if unknown:
            raise ValueError(
                f"{cls.__name__}.load: unexpected keyword argument(s) {unknown} (use the rbln_ prefix)"
            )
        return cls.from_any(doc, **overrides)


@dataclass
class NPUGemma3ForCausalLMConfig(NPUModelConfig):
    max_seq_len: int | None = None  # longest prompt + generation; None: max_position_embeddings
    prefill_chunk_size: int = 256  # prompt tokens per prefill step; positive, divisible by 64
    image_prefill_chunk_size: int | None = None  # must equal mm_tokens_per_image when set
    use_position_ids: bool | None = None  # accept explicit position ids
    use_attention_mask: bool | None = None  # accept an attention mask (left padding)
    kvcache_partition_len: int | None = None  # KV-cache tile of the decode kernel; divides max_seq_len
    tensor_parallel_size: int = 1  # chips a layer is split over (only 1 for now)
    lora_config: dict | None = field(default=None)  # LoRA adapters (not yet supported)

    def __post_init__(self):
        super().__post_init__()
        _positive_int("max_seq_len", self.max_seq_len)
        _positive_int("prefill_chunk_size", self.prefill_chunk_size, allow_none=False)
        if self.prefill_chunk_size % 64:
            raise ValueError(f"prefill_chunk_size must be divisible by 64, got {self.prefill_chunk_size}")
        _positive_int("image_prefill_chunk_size", self.image_prefill_chunk_size)
        for name in ("use_position_ids", "use_attention_mask"):
            if getattr(self, name) not in (None, True, False):
                raise ValueError(f"{name} must be a bool or None, got {getattr(self, name)!r}")
        _positive_int("kvcache_partition_len", self.kvcache_partition_len)
        if self.kvcache_partition_len and self.max_seq_len and self.max_seq_len % self.kvcache_partition_len:
            raise ValueError(
                f"kvcache_partition_len {self.kvcache_partition_len} must divide max_seq_len {self.max_seq_len}"
            )
        _positive_int("tensor_parallel_size", self.tensor_parallel_size, allow_none=False)
        if self.tensor_parallel_size > 1:
            raise NotImplementedError(
                f"tensor_parallel_size {self.tensor_parallel_size}: only 1 chip is emulated"
            )
        if self.lora_config is not None:
            raise NotImplementedError("lora_config: LoRA adapters are not supported yet")


@dataclass
class NPUSiglipVisionModelConfig(NPUModelConfig):
    """The vision tower of an image+text model. Images are encoded one at a time (static
    shapes, as on the chip), so ``batch_size`` is 1; the chip fields (``npu``, ``mode``,
    ``numerics``) come from the enclosing model's config."""

    image_size: int | list[int] | None = None  # checked against vision_config.image_size when set

    def __post_init__(self):
        super().__post_init__()
        if self.batch_size != 1:
            raise ValueError(
                f"batch_size must be 1 for the vision tower (images are encoded one at a time), "
                f"got {self.batch_size!r}"
            )
        size = self.image_size
        if isinstance(size, (list, tuple)):
            if len(size) != 2:
                raise ValueError(f"image_size must be an int or a (height, width) pair, got {size!r}")
            for v in size:
                _positive_int("image_size", v)
            self.image_size = list(size)
        else:
            _positive_int("image_size", size)


# Fields the image+text config holds for the whole model and hands down to its sub-configs.
CHIP_FIELDS = ("npu", "mode", "numerics")


def _npu_key(value):
    """A comparable form of an ``npu`` field (a preset name, an NPUConfig or its dict)."""
    try:
        return get_preset(NPUConfig.from_dict(value) if isinstance(value, dict) else value)
    except (ValueError, TypeError) as e:
        raise ValueError(f"npu: {e}") from None


def _given(name: str, value, cls) -> dict:
    """The fields a sub-config sets: a dict's keys, or an instance's non-default fields."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, cls):
        return {
            f.name: getattr(value, f.name)
            for f in fields(cls)
            if getattr(value, f.name) != (f.default if f.default_factory is MISSING else f.default_factory())
        }
    raise ValueError(f"{name} must be a dict or {cls.__name__}, got {type(value).__name__}")


@dataclass
class NPUGemma3ForConditionalGenerationConfig(NPUModelConfig):
    """Configuration of the image+text model (Optimum RBLN's
    ``RBLNGemma3ForConditionalGenerationConfig``): ``batch_size`` (the language model's decode
    batch; default 1), ``vision_tower`` (an ``NPUSiglipVisionModelConfig`` or its dict) and
    ``language_model`` (an ``NPUGemma3ForCausalLMConfig`` or its dict). Both parts run on one
    chip: ``npu``, ``mode`` and ``numerics`` are set here (or in a sub-config, taken up here) and
    handed down; a sub-config that sets one of them, or ``batch_size``, differently raises."""

    batch_size: int | None = None
    vision_tower: NPUSiglipVisionModelConfig | dict | None = None
    language_model: NPUGemma3ForCausalLMConfig | dict | None = None
    # keyword-only, after the sub-configs: the positional order is Optimum RBLN's
    npu: str | NPUConfig | None = field(default=None, kw_only=True)
    mode: str | None = field(default=None, kw_only=True)
    numerics: str | None = field(default=None, kw_only=True)

    SUBMODULES = {"vision_tower": NPUSiglipVisionModelConfig, "language_model": NPUGemma3ForCausalLMConfig}

    def __post_init__(self):
        given = {name: _given(name, getattr(self, name), cls) for name, cls in self.SUBMODULES.items()}
        lm, vt = given["language_model"], given["vision_tower"]
        if self.batch_size is None:
            self.batch_size = lm.get("batch_size", 1)
        _positive_int("batch_size", self.batch_size, allow_none=False)
        if lm.get("batch_size", self.batch_size) != self.batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} and language_model.batch_size {lm['batch_size']} differ; "
                "set batch_size only"
            )
        for name in CHIP_FIELDS:
            key = _npu_key if name == "npu" else (lambda v: v)
            top = getattr(self, name)
            for sub, d in given.items():
                if name not in d:
                    continue
                if top is None:
                    top = d[name]
                elif key(d[name]) != key(top):
                    raise ValueError(
                        f"{sub}.{name} {d[name]!r} differs from the model's {name} {top!r}: both parts "
                        "run on one chip; set it once, at the top level"
                    )
            setattr(self, name, top if top is not None else NPUModelConfig.__dataclass_fields__[name].default)
        super().__post_init__()
        chip = {name: getattr(self, name) for name in CHIP_FIELDS}
        for sub, d in (("vision_tower", vt), ("language_model", {**lm, "batch_size": self.batch_size})):
            try:
                setattr(self, sub, self.SUBMODULES[sub].create({**d, **chip}))
            except ValueError as e:
                raise ValueError(f"{sub}: {e}") from None

    def to_dict(self) -> dict:
        d = super().to_dict()
        for sub in self.SUBMODULES:
            inherited = CHIP_FIELDS + (("batch_size",) if sub == "language_model" else ())
            d[sub] = {k: v for k, v in getattr(self, sub).to_dict().items() if k not in inherited}
        return d

    @classmethod
    def from_any(cls, value=None, **overrides):
        """As ``NPUModelConfig.from_any``; a sub-config given as a dict in ``overrides`` updates
        the one in ``value`` field by field, and a chip field or ``batch_size`` set at the top
        level replaces what ``value``'s sub-configs say."""
        merged = dict(cls._as_dict(value))
        for key, v in overrides.items():
            sub_cls = cls.SUBMODULES.get(key)
            if sub_cls is not None and isinstance(v, dict) and merged.get(key) is not None:
                merged[key] = {**_given(key, merged[key], sub_cls), **v}
            else:
                merged[key] = v
        for name in ("batch_size",) + CHIP_FIELDS:
            if name not in overrides:
                continue
            for sub, sub_cls in cls.SUBMODULES.items():
                if name not in (overrides.get(sub) or {}) and merged.get(sub) is not None:
                    merged[sub] = {k: v for k, v in _given(sub, merged[sub], sub_cls).items() if k != name}
        return cls.create(merged)


# Optimum RBLN names, so code written for it runs with only the import changed.
RBLNGemma3ForCausalLMConfig = NPUGemma3ForCausalLMConfig
RBLNSiglipVisionModelConfig = NPUSiglipVisionModelConfig
RBLNGemma3ForConditionalGenerationConfig = NPUGemma3ForConditionalGenerationConfig
