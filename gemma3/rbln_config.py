"""Compile-time configuration of a model on the NPU, as Optimum RBLN's ``RBLN*Config`` classes.

Every field of Optimum RBLN's ``RBLNModelConfig``, ``RBLNDecoderOnlyModelForCausalLMConfig``
and the Gemma3 configs, with its defaults, its positional order (``RBLNGemma3ForCausalLMConfig(
use_position_ids, use_attention_mask, prefill_chunk_size, image_prefill_chunk_size)``, the rest
by keyword), ``None`` meaning "the default" and its error classes: a bad value raises
``ValueError`` naming the field and the value, an unknown keyword ``ValueError("Unexpected
arguments: ...")``. ``load(path, **kwargs)`` reads ``rbln_config.json`` (ours, or the one
Optimum RBLN writes: ``cls_name``, ``_compile_cfgs``, ...) and lets ``rbln_``-prefixed kwargs
(``rbln_max_seq_len=512``) override saved values; a file of another class logs a warning.

``normalize(rbln_config, kwargs)`` is the one way in: ``None``, a dict, a config object, a path
to a saved one, plus ``rbln_*`` kwargs, turned into one config object where ``from_pretrained``
is entered, and passed down from there.

Fields that only steer Optimum RBLN's runtime on real devices (``create_runtimes``, ``device``,
``device_map``, ``activate_profiler``, ``timeout``, ``optimize_host_memory``) are checked,
stored and saved, and change nothing here. ``tensor_parallel_size`` / ``num_devices`` above 1
split the language model over that many emulated devices (``gemma3/tensor_parallel.py``;
``backend`` says where they run). ``lora_config`` (a dict or an
``RBLNLoRAConfig``, gemma3/lora.py) becomes an ``RBLNLoRAConfig``, saved as its dict.

The image+text model's config (``NPUGemma3ForConditionalGenerationConfig``) holds two
sub-configs, ``vision_tower`` and ``language_model``, as dicts or config objects; overriding
one with a dict (``rbln_language_model={"max_seq_len": 1024}``) updates it field by field.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import KW_ONLY, dataclass, field, fields

from npu_emulator import PRESETS, RBLN_NPU_NAMES, NPUConfig, get_preset

from .atomic import new_file
from .lora import RBLNLoRAConfig

CONFIG_NAME = "rbln_config.json"
logger = logging.getLogger(__name__)

# Optimum RBLN's attention limits (modeling_attention_utils.py): its compiler's, kept so that a
# config that compiles here compiles there too.
DEFAULT_FLASH_ATTN_PARTITION_LENGTH = 16_384
DEFAULT_MAX_EAGER_ATTN_SEQUENCE_LENGTH = 32_768
MIN_FLASH_ATTN_MAX_SEQ_LEN = 8_192
MIN_FLASH_ATTN_PARTITION_LENGTH = 4_096
MAX_FLASH_ATTN_PARTITION_LENGTH = 32_768
MAX_SLIDING_WINDOW_SIZE = 32_768

PHASES = ("prefill", "image_prefill", "decode")
CACHE_IMPLS = ("static", "sliding_window", "hybrid")
# Optimum RBLN's RBLNQuantizationConfig: what it accepts; we emulate none of the formats yet.
QUANT_FORMATS = ("rbln",)
QUANT_WEIGHTS = ("int4", "int8", "fp8", "fp16")
QUANT_ACTIVATIONS = ("int8", "fp8", "fp16")
QUANT_KVCACHES = ("fp8", "fp16")
# Keys of an Optimum RBLN rbln_config.json that describe its compiler's artefacts, not a model
# here: read and dropped.
OPTIMUM_ONLY_KEYS = ("_compile_cfgs", "_torch_dtype")


def strip_rbln(kwargs: dict) -> tuple[dict, dict]:
    """Split kwargs into (config fields from ``rbln_*`` keys, everything else)."""
    ours = {k[len("rbln_") :]: v for k, v in kwargs.items() if k.startswith("rbln_")}
    rest = {k: v for k, v in kwargs.items() if not k.startswith("rbln_")}
    return ours, rest


def resolve_npu(npu) -> NPUConfig:
    """The chip of an ``npu`` field: a preset name, an Optimum RBLN NPU name, an NPUConfig or
    its dict."""
    if isinstance(npu, dict):
        return NPUConfig.from_dict(npu)
    if isinstance(npu, str) and npu in RBLN_NPU_NAMES:
        return get_preset(RBLN_NPU_NAMES[npu])
    if isinstance(npu, (str, NPUConfig)) and (isinstance(npu, NPUConfig) or npu in PRESETS):
        return get_preset(npu)
    raise ValueError(
        f"npu: unknown NPU {npu!r}; known: our presets {sorted(PRESETS)} and Optimum RBLN's names "
        f"{sorted(RBLN_NPU_NAMES)}"
    )


def _positive_int(name, value, *, allow_none=True):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _bool(name, value):
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool or None, got {value!r}")


def config_class(cls):
    """A dataclass whose ``__init__`` behaves as Optimum RBLN's: ``None`` for any field means
    its default, an unknown keyword is a ``ValueError`` naming it, and the keys of an Optimum
    RBLN ``rbln_config.json`` that describe its compiler (``OPTIMUM_ONLY_KEYS``) are dropped.
    The fields given (not None) are remembered, for sub-config merging."""
    cls = dataclass(cls)
    generated = cls.__init__
    names = [f.name for f in fields(cls) if f.init]
    positional = [f.name for f in fields(cls) if f.init and not f.kw_only]

    @functools.wraps(generated)
    def __init__(self, *args, **kwargs):
        if len(args) > len(positional):
            raise TypeError(
                f"{cls.__name__} takes at most {len(positional)} positional arguments "
                f"({', '.join(positional)}), got {len(args)}"
            )
        for name, value in zip(positional, args):
            if name in kwargs:
                raise TypeError(f"{cls.__name__} got multiple values for argument {name!r}")
            kwargs[name] = value
        for key in OPTIMUM_ONLY_KEYS:
            kwargs.pop(key, None)
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise ValueError(f"Unexpected arguments: {unknown} ({cls.__name__}; fields: {sorted(names)})")
        given = {k: v for k, v in kwargs.items() if v is not None}
        object.__setattr__(self, "_given", frozenset(given))
        generated(self, **given)

    cls.__init__ = __init__
    return cls


BACKENDS = ("local", "ray")  # where tensor-parallel devices run (gemma3/tensor_parallel.py)


@config_class
class NPUModelConfig:
    """Fields every model shares (Optimum RBLN's ``RBLNModelConfig``, plus the emulator's
    ``mode`` and ``numerics``); subclasses add their own. All keyword-only here."""

    _: KW_ONLY
    batch_size: int = 1  # sequences decoded together (the compiled decode batch)
    npu: str | NPUConfig = "atom"  # chip: a preset name, an Optimum RBLN name (RBLN-CA25), an NPUConfig
    mode: str = "fast"  # "fast" (whole-operator math, cached schedules) or "tile" (every instruction)
    numerics: str = "bf16"  # "bf16" (device rounding) or "fp32" (reference numerics)
    tensor_parallel_size: int | None = None  # devices every layer is split over (gemma3/tensor_parallel.py)
    num_devices: int | None = None  # Optimum RBLN's newer name for tensor_parallel_size
    backend: str | None = None  # ours: where the devices run, "local" (default) or "ray" (one actor each)
    # Runtime options of real devices: checked, stored and saved; nothing here depends on them.
    create_runtimes: bool | None = None  # make device runtimes at load (the emulator always runs)
    device: int | list[int] | None = None  # device id(s) to load onto (one emulated device: 0)
    device_map: dict | None = None  # compiled-model name -> device id(s)
    activate_profiler: bool | None = None  # the real runtime's profiler (see last_report here)
    timeout: int | None = None  # runtime timeout in seconds (the real runtime's default: 60)
    optimize_host_memory: bool | None = None  # deprecated in Optimum RBLN; accepted, unused
    optimum_rbln_version: str | None = None  # written by Optimum RBLN; kept as read
    cls_name: str | None = None  # the class a saved file names (Optimum RBLN's key)

    def __post_init__(self):
        _positive_int("batch_size", self.batch_size, allow_none=False)
        if isinstance(self.npu, dict):
            self.npu = NPUConfig.from_dict(self.npu)
        try:
            resolve_npu(self.npu)
        except (ValueError, TypeError) as e:
            raise ValueError(f"npu: {e}".replace("npu: npu: ", "npu: ")) from None
        if self.mode not in ("fast", "tile"):
            raise ValueError(f"mode must be 'fast' or 'tile', got {self.mode!r}")
        if self.numerics not in ("bf16", "fp32"):
            raise ValueError(f"numerics must be 'bf16' or 'fp32', got {self.numerics!r}")
        _positive_int("tensor_parallel_size", self.tensor_parallel_size)
        _positive_int("num_devices", self.num_devices)
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"backend must be 'local' or 'ray', got {self.backend!r}")
        if self.tensor_parallel_size and self.num_devices and self.tensor_parallel_size != self.num_devices:
            raise ValueError(
                f"tensor_parallel_size {self.tensor_parallel_size} and num_devices {self.num_devices} "
                "differ; they name one thing (set one)"
            )
        for name in ("create_runtimes", "activate_profiler", "optimize_host_memory"):
            _bool(name, getattr(self, name))
        dev = self.device
        ids = dev if isinstance(dev, list) else [dev] if dev is not None else []
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in ids):
            raise ValueError(f"device must be a device id (int >= 0) or a list of them, got {dev!r}")
        if self.device_map is not None and not isinstance(self.device_map, dict):
            raise ValueError(f"device_map must be a dict, got {type(self.device_map).__name__}")
        _positive_int("timeout", self.timeout)
        if self.optimize_host_memory is not None:
            logger.warning("`optimize_host_memory` is deprecated and will be removed in future versions.")
        names = (type(self).__name__, rbln_name(type(self)))
        if self.cls_name is not None and self.cls_name not in names:
            raise ValueError(f"cls_name {self.cls_name!r} is not {names[1]!r} (or {names[0]!r})")
        self.cls_name = None  # a class's own name is not a setting

    @property
    def npu_config(self) -> NPUConfig:
        return resolve_npu(self.npu)

    @property
    def devices(self) -> int:
        """Devices the model is compiled for (tensor_parallel_size or num_devices; 1 if unset)."""
        return self.tensor_parallel_size or self.num_devices or 1

    def check_compilable(self, where: str = "") -> None:
        """Refuse, at compile, what the config accepts but the emulator cannot build."""

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
        return cls(**d)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "cls_name"}
        if isinstance(d["npu"], NPUConfig):
            d["npu"] = d["npu"].to_dict()
        return d

    def save(self, directory) -> str:
        path = os.path.join(os.fspath(directory), CONFIG_NAME)
        doc = {"cls_name": rbln_name(type(self)), **self.to_dict()}
        for sub, sub_cls in getattr(self, "SUBMODULES", {}).items():  # Optimum RBLN names each part's class
            doc[sub] = {"cls_name": rbln_name(sub_cls), **doc[sub]}
        with new_file(path, suffix=".json") as tmp, open(tmp, "w") as f:
            json.dump(doc, f, indent=2)
        return path

    @classmethod
    def read(cls, path) -> tuple[str, dict]:
        """(the class it names, its fields) of a saved ``rbln_config.json`` (ours or Optimum
        RBLN's), a file or the directory holding it."""
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
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: holds a JSON {type(doc).__name__}, not an object of fields")
        if "_meta" in doc:  # Optimum RBLN's own refusal of its pre-0.8 format
            raise RuntimeError(
                f"`{path}` is an old version. Please recompile the model to get the latest config file."
            )
        saved = doc.pop("cls_name", None) or doc.pop("class", None) or cls.__name__
        doc.pop("class", None)
        return saved, doc

    @classmethod
    def load(cls, path, **kwargs):
        """Read ``rbln_config.json`` (a file or the directory holding it); ``rbln_*`` kwargs
        override saved values. A file naming another class logs a warning, as Optimum RBLN."""
        saved, doc = cls.read(path)
        if saved not in (cls.__name__, rbln_name(cls)):
            logger.warning(f"Expected {rbln_name(cls)}, but got {saved}.")
        overrides, rest = strip_rbln(kwargs)
        if rest:
            raise ValueError(
                f"{cls.__name__}.load: unexpected keyword argument(s) {sorted(rest)} (use the rbln_ prefix)"
            )
        return cls.from_any(doc, **overrides)


def rbln_name(cls) -> str:
    """Optimum RBLN's name of a config class (``NPU...`` -> ``RBLN...``)."""
    return cls.__name__.replace("NPU", "RBLN", 1) if cls.__name__.startswith("NPU") else cls.__name__


def normalize(config_cls, rbln_config=None, kwargs=None):
    """The one way in for a model's configuration: ``rbln_config`` (None, a dict, a config
    object, or the path of a saved ``rbln_config.json`` / its directory) with the ``rbln_*``
    entries of ``kwargs`` over it, as one ``config_cls`` object. Returns (config, the kwargs
    that are not ``rbln_*``)."""
    overrides, rest = strip_rbln(dict(kwargs or {}))
    if isinstance(rbln_config, (str, os.PathLike)):
        rbln_config = config_cls.load(rbln_config)
    if rbln_config is not None and not isinstance(rbln_config, (dict, config_cls)):
        raise TypeError(
            f"rbln_config must be a dict, a {config_cls.__name__} or a path to a saved one, "
            f"got {type(rbln_config).__name__}"
        )
    return config_cls.from_any(rbln_config, **overrides), rest


def given_fields(cfg) -> dict:
    """The fields a config object was given (not the defaults it filled in); a sub-config's
    as a dict of its own given fields, less those the enclosing config hands down to it."""
    out = {}
    for name in cfg._given:
        value = getattr(cfg, name)
        if isinstance(value, NPUModelConfig):
            value = {k: v for k, v in given_fields(value).items() if k not in CHIP_FIELDS + ("batch_size",)}
        out[name] = value
    return out


def _quantization(value) -> dict:
    """Optimum RBLN's RBLNQuantizationConfig checks, on a dict; None / {} is no quantization."""
    if not value:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"quantization must be a dict, got {type(value).__name__}")
    q = dict(value)
    unknown = sorted(set(q) - {"format", "weights", "activations", "kv_caches", "precision"})
    if unknown:
        raise ValueError(f"quantization: unexpected arguments {unknown}")
    precision = q.pop("precision", None)
    if precision is not None:
        if q.get("weights") is not None or q.get("activations") is not None:
            raise ValueError("`precision` and `weights` or `activations` cannot be set at the same time.")
        if precision != "w4a16":
            raise ValueError(f"Invalid precision: {precision}")
        q.update(weights="int4", activations="fp16")
    q = {
        "format": q.get("format") or "rbln",
        "weights": q.get("weights") or "fp16",
        "activations": q.get("activations") or "fp16",
        "kv_caches": q.get("kv_caches") or "fp16",
    }
    for key, allowed in (
        ("format", QUANT_FORMATS),
        ("weights", QUANT_WEIGHTS),
        ("activations", QUANT_ACTIVATIONS),
        ("kv_caches", QUANT_KVCACHES),
    ):
        if q[key] not in allowed:
            raise ValueError(f"Invalid {key}: {q[key]}, supported {key} are: {list(allowed)}")
    if q["weights"] == "fp16" and q["activations"] == "fp16":
        raise ValueError(
            "weights and activations of QuantizationConfig cannot be both fp16. It is meaningless."
        )
    return q


@config_class
class NPUGemma3ForCausalLMConfig(NPUModelConfig):
    """Optimum RBLN's ``RBLNGemma3ForCausalLMConfig`` (and the decoder-only fields it inherits).
    Positional: ``use_position_ids, use_attention_mask, prefill_chunk_size,
    image_prefill_chunk_size``; everything else by keyword."""

    use_position_ids: bool | None = None  # always True for Gemma3 (as Optimum RBLN forces it)
    use_attention_mask: bool | None = None  # always True for Gemma3: left-padded batches
    prefill_chunk_size: int = 256  # prompt tokens per prefill step; positive, divisible by 64
    image_prefill_chunk_size: int | None = None  # must equal mm_tokens_per_image when set
    _: KW_ONLY
    max_seq_len: int | None = None  # longest prompt + generation; None: max_position_embeddings
    use_inputs_embeds: bool = False  # compile a prefill that takes embeddings (inputs_embeds)
    attn_impl: str | None = None  # "eager" or "flash_attn" (None: eager, or flash_attn with a partition)
    kvcache_partition_len: int | None = None  # flash_attn: KV cache positions per partition
    kvcache_block_size: int | None = None  # paged-cache block: the partition (flash) or max_seq_len (eager)
    kvcache_num_blocks: int | None = None  # blocks in the cache; at least one sequence's worth per batch row
    quantization: dict | None = None  # Optimum RBLN's quantization dict, checked; not emulated
    lora_config: RBLNLoRAConfig | dict | None = None  # LoRA adapters, fixed at compile (gemma3/lora.py)
    decoder_batch_sizes: list[int] | None = None  # one decoder per size, a batch padded to the next
    cache_impl: str = "static"  # "static", "sliding_window", "hybrid": stored; caches follow layer_types
    sliding_window: int | None = None  # window of the sliding layers; must match config.json when set
    sliding_window_layers: list[int] = field(default_factory=list)  # ditto, the sliding layers' indices
    phases: list[str] = field(default_factory=lambda: ["prefill", "decode"])  # phases compiled
    logits_to_keep: int = 1  # positions whose logits prefill returns: the last one (0 means 1)
    output_hidden_states: bool = False  # forward also returns every layer's hidden states
    # Ours, emulation only: drop Optimum RBLN's flash_attn minimums (partitions of 4 096
    # positions, max_seq_len 8 192) so that tiny models run flash attention in tests; the
    # other constraints stay. Such a config does not compile on Optimum RBLN.
    relax_flash_attn_limits: bool = False

    def __post_init__(self):
        super().__post_init__()
        for name in ("use_position_ids", "use_attention_mask", "use_inputs_embeds", "output_hidden_states"):
            _bool(name, getattr(self, name))
        _bool("relax_flash_attn_limits", self.relax_flash_attn_limits)
        # Optimum RBLN: "use_attention_mask and use_position_ids are always True for Gemma3"
        self.use_position_ids = self.use_attention_mask = True
        _positive_int("max_seq_len", self.max_seq_len)
        _positive_int("prefill_chunk_size", self.prefill_chunk_size, allow_none=False)
        if self.prefill_chunk_size % 64:
            raise ValueError(f"prefill_chunk_size must be divisible by 64, got {self.prefill_chunk_size}")
        _positive_int("image_prefill_chunk_size", self.image_prefill_chunk_size)
        if self.attn_impl not in (None, "eager", "flash_attn"):
            raise ValueError(f"Unknown `attn_impl` : {self.attn_impl}. (Available : 'eager', 'flash_attn`)")
        for name in ("kvcache_partition_len", "kvcache_block_size", "kvcache_num_blocks", "sliding_window"):
            _positive_int(name, getattr(self, name))
        if self.max_seq_len is not None:
            self.attention(self.max_seq_len)  # the attention constraints, as soon as they can be checked
        self.quantization = _quantization(self.quantization)
        self.lora_config = RBLNLoRAConfig.create(self.lora_config)
        if self.cache_impl not in CACHE_IMPLS:
            raise ValueError(f"cache_impl must be one of {list(CACHE_IMPLS)}, got {self.cache_impl!r}")
        if not isinstance(self.sliding_window_layers, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.sliding_window_layers
        ):
            raise ValueError(
                f"sliding_window_layers must be a list of layer indices, got {self.sliding_window_layers!r}"
            )
        if not isinstance(self.phases, list):
            raise ValueError("`phases` must be a list.")
        if not all(p in PHASES for p in self.phases):
            raise ValueError(f"All elements in `phases` must be of type `PhaseType`({PHASES}).")
        if (
            isinstance(self.logits_to_keep, bool)
            or not isinstance(self.logits_to_keep, int)
            or self.logits_to_keep < 0
        ):
            raise ValueError(f"logits_to_keep must be a non-negative integer, got {self.logits_to_keep!r}")
        self.logits_to_keep = self.logits_to_keep or 1  # Optimum RBLN: 0 means the causal LM's default, 1
        if self.logits_to_keep > 1:
            raise NotImplementedError("`logits_to_keep` > 1 is currently not supported for RBLN models.")
        if "decode" not in self.phases:
            self.decoder_batch_sizes = None
        else:
            sizes = self.decoder_batch_sizes if self.decoder_batch_sizes is not None else [self.batch_size]
            if not isinstance(sizes, list) or not sizes:
                raise ValueError(f"decoder_batch_sizes must be a non-empty list, got {sizes!r}")
            for s in sizes:
                _positive_int("decoder_batch_sizes entries", s, allow_none=False)
            if max(sizes) > self.batch_size:
                raise ValueError(
                    f"Decoder batch size ({max(sizes)}) must be less than or equal to the runtime batch "
                    f"size ({self.batch_size})."
                )
            if max(sizes) < self.batch_size:
                logger.warning(
                    f"Maximum decoder batch size ({max(sizes)}) is less than the model's batch size "
                    f"({self.batch_size}). Appending the model's batch size to the decoder batch size."
                )
                sizes = [*sizes, self.batch_size]
            self.decoder_batch_sizes = sorted(set(sizes), reverse=True)  # larger first, as Optimum RBLN

    def attention(self, max_seq_len: int) -> tuple[str, int | None, int]:
        """(attn_impl, kvcache_partition_len, kvcache_block_size) resolved for ``max_seq_len``
        with Optimum RBLN's defaults, checked against its constraints: eager up to 32 768
        positions with one block of max_seq_len; flash_attn with 4 096..32 768-position
        partitions (16 384 by default), at least two of them, dividing max_seq_len (>= 8 192),
        and the block equal to the partition. ``relax_flash_attn_limits`` drops the two
        minimums (4 096 and 8 192), for emulation only."""
        impl, part, block = self.attn_impl or "eager", self.kvcache_partition_len, self.kvcache_block_size
        if part is not None and impl == "eager":
            impl = "flash_attn"  # a partition length means flash attention (Optimum RBLN switches too)
        if part is None and impl == "flash_attn":
            part = DEFAULT_FLASH_ATTN_PARTITION_LENGTH
        if block is None:
            block = max_seq_len if impl == "eager" else part
        if impl == "eager" and max_seq_len > DEFAULT_MAX_EAGER_ATTN_SEQUENCE_LENGTH:
            raise ValueError(
                f"`max_seq_len` is set to {max_seq_len}, which exceeds the limit of "
                f"{DEFAULT_MAX_EAGER_ATTN_SEQUENCE_LENGTH} for 'eager' attention. Please reduce the "
                f"`max_seq_len` to {DEFAULT_MAX_EAGER_ATTN_SEQUENCE_LENGTH} or lower, or consider "
                "switching `attn_impl` to 'flash_attn' for larger sequence lengths."
            )
        if impl == "flash_attn":
            if max_seq_len // part < 2 or max_seq_len % part:
                raise ValueError(
                    f"`max_seq_len` ({max_seq_len}) must be a multiple of `kvcache_partition_len` ({part}) "
                    "when using 'flash_attn'. Please adjust either value to meet this requirement."
                )
            least = 1 if self.relax_flash_attn_limits else MIN_FLASH_ATTN_PARTITION_LENGTH
            if not least <= part <= MAX_FLASH_ATTN_PARTITION_LENGTH:
                raise ValueError(
                    f"`kvcache_partition_len` ({part}) is out of the supported range for 'flash_attn' "
                    f"({least} <= `kvcache_partition_len` <= "
                    f"{MAX_FLASH_ATTN_PARTITION_LENGTH}). Please provide a valid value within this range."
                )
            if max_seq_len < MIN_FLASH_ATTN_MAX_SEQ_LEN and not self.relax_flash_attn_limits:
                raise ValueError(
                    f"`max_seq_len` ({max_seq_len}) is too small for 'flash_attn'. The minimum supported "
                    f"value is {MIN_FLASH_ATTN_MAX_SEQ_LEN}. Please increase `max_seq_len` to meet this "
                    "requirement, or consider switching `attn_impl` to 'eager' for shorter lengths."
                )
            if block != part:
                raise ValueError(
                    f"When using 'flash attention', the `kvcache_block_size` ({block}) must always be set "
                    f"equal to the `kvcache_partition_len` {part}."
                )
        elif block != max_seq_len:
            raise ValueError(
                f"When using 'eager attention', the `kvcache_block_size` ({block}) must always be set "
                f"equal to the `max_seq_len` {max_seq_len}."
            )
        return impl, part, block

    def check_compilable(self, where: str = "") -> None:
        super().check_compilable(where)
        if self.quantization:
            q = self.quantization
            raise NotImplementedError(
                f"{where}quantization weights={q['weights']} activations={q['activations']} "
                f"kv_caches={q['kv_caches']} (format {q['format']!r}): quantized formats are not emulated"
            )

    def check_model(self, text, max_seq_len: int, where: str = "") -> None:
        """At compile, against the model's config: the attention constraints, the cache
        fields (Gemma3's cache is hybrid, its window and sliding layers those of config.json),
        and the paged cache's size."""
        self.check_compilable(where)
        if self.devices > 1:
            from .tensor_parallel import plan_shards

            if self.lora_config is not None:
                raise NotImplementedError(
                    f"{where}lora_config with tensor_parallel_size {self.devices}: LoRA on sharded "
                    "projections is not built; compile LoRA models for 1 device"
                )
            try:
                plan_shards(text, self.devices)
            except ValueError as e:
                raise ValueError(f"{where}{e}") from None
        _, _, block = self.attention(max_seq_len)
        sliding = [i for i in range(text.num_hidden_layers) if text.is_sliding(i)]
        if self.sliding_window is not None and self.sliding_window != text.sliding_window:
            raise ValueError(
                f"{where}sliding_window {self.sliding_window} differs from config.json's sliding_window "
                f"{text.sliding_window}: the sliding layers were trained with that window"
            )
        if self.sliding_window_layers and sorted(self.sliding_window_layers) != sliding:
            raise ValueError(
                f"{where}sliding_window_layers {self.sliding_window_layers} differ from the sliding layers "
                f"of config.json's layer_types {sliding}"
            )
        if text.sliding_window > MAX_SLIDING_WINDOW_SIZE - self.prefill_chunk_size:
            raise ValueError(
                f"Sliding window size ({text.sliding_window}) must be less than 32768 - prefill_chunk_size "
                f"({MAX_SLIDING_WINDOW_SIZE - self.prefill_chunk_size})"
            )
        if self.kvcache_num_blocks is not None:
            need = self.batch_size * -(-max_seq_len // block)
            if self.kvcache_num_blocks < need:
                raise ValueError(
                    f"{where}kvcache_num_blocks {self.kvcache_num_blocks} holds fewer than the {need} blocks "
                    f"of {block} positions that batch_size {self.batch_size} sequences of max_seq_len "
                    f"{max_seq_len} need"
                )

    @property
    def can_generate(self) -> bool:
        return "decode" in self.phases

    @property
    def use_lora(self) -> bool:
        return self.lora_config is not None

    def to_dict(self) -> dict:
        d = super().to_dict()
        if self.lora_config is not None:
            d["lora_config"] = self.lora_config.to_dict()
        return d


@config_class
class NPUSiglipVisionModelConfig(NPUModelConfig):
    """The vision tower of an image+text model (Optimum RBLN's ``RBLNSiglipVisionModelConfig``;
    positional: ``batch_size, image_size``). Images are encoded one at a time (static shapes,
    as on the chip), so ``batch_size`` is 1; the chip fields (``npu``, ``mode``, ``numerics``)
    come from the enclosing model's config."""

    batch_size: int = 1
    image_size: int | list[int] | None = None  # checked against vision_config.image_size when set
    _: KW_ONLY
    interpolate_pos_encoding: bool = False  # only the checkpoint's image size is supported
    output_hidden_states: bool = False  # stored; the tower's hidden states are not returned
    output_attentions: bool = False  # stored; attention weights are not returned

    def __post_init__(self):
        super().__post_init__()
        if self.batch_size != 1:
            raise ValueError(
                f"batch_size must be 1 for the vision tower (images are encoded one at a time), "
                f"got {self.batch_size!r}"
            )
        for name in ("interpolate_pos_encoding", "output_hidden_states", "output_attentions"):
            _bool(name, getattr(self, name))
        if self.interpolate_pos_encoding:
            raise NotImplementedError(
                "vision_tower.interpolate_pos_encoding: images other than the checkpoint's image_size"
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
DEVICE_FIELDS = ("tensor_parallel_size", "num_devices", "backend")  # the language model's


def _npu_key(value):
    """A comparable form of an ``npu`` field (a preset name, an Optimum RBLN name, an NPUConfig
    or its dict)."""
    try:
        return resolve_npu(value)
    except (ValueError, TypeError) as e:
        raise ValueError(f"npu: {e}") from None


def _given(name: str, value, cls) -> dict:
    """The fields a sub-config sets: a dict's keys, or the fields an instance was given."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in ("cls_name",) + OPTIMUM_ONLY_KEYS}
    if isinstance(value, cls):
        return given_fields(value)
    raise ValueError(f"{name} must be a dict or {cls.__name__}, got {type(value).__name__}")


@config_class
class NPUGemma3ForConditionalGenerationConfig(NPUModelConfig):
    """Configuration of the image+text model (Optimum RBLN's
    ``RBLNGemma3ForConditionalGenerationConfig(batch_size, vision_tower, language_model)``):
    ``batch_size`` (the language model's decode batch; default 1), ``vision_tower`` (an
    ``NPUSiglipVisionModelConfig`` or its dict) and ``language_model`` (an
    ``NPUGemma3ForCausalLMConfig`` or its dict). Both parts run on one chip: ``npu``, ``mode``
    and ``numerics`` are set here (or in a sub-config, taken up here) and handed down; a
    sub-config that sets one of them, or ``batch_size``, differently raises."""

    batch_size: int | None = None
    vision_tower: NPUSiglipVisionModelConfig | dict | None = None
    language_model: NPUGemma3ForCausalLMConfig | dict | None = None
    _: KW_ONLY
    npu: str | NPUConfig | None = None
    mode: str | None = None
    numerics: str | None = None

    SUBMODULES = {"vision_tower": NPUSiglipVisionModelConfig, "language_model": NPUGemma3ForCausalLMConfig}

    def __post_init__(self):
        given = {name: _given(name, getattr(self, name), cls) for name, cls in self.SUBMODULES.items()}
        lm, vt = given["language_model"], given["vision_tower"]
        if self.batch_size is None:
            self.batch_size = lm.get("batch_size", 1)
            if "batch_size" in lm:
                object.__setattr__(self, "_given", self._given | {"batch_size"})
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
                    object.__setattr__(self, "_given", self._given | {name})  # set, though in a part
                elif key(d[name]) != key(top):
                    raise ValueError(
                        f"{sub}.{name} {d[name]!r} differs from the model's {name} {top!r}: both parts "
                        "run on one chip; set it once, at the top level"
                    )
            setattr(self, name, top if top is not None else NPUModelConfig.__dataclass_fields__[name].default)
        super().__post_init__()
        chip = {name: getattr(self, name) for name in CHIP_FIELDS}
        # The devices: the language model is split over them (set here, handed down, as Optimum
        # RBLN's submodule configs inherit tensor_parallel_size); the vision tower runs on one,
        # as there (SigLIP has no tensor-parallel support: the field is dropped for it).
        for name in DEVICE_FIELDS:
            if getattr(self, name) is not None and name not in lm:
                lm = {**lm, name: getattr(self, name)}
        if any((vt.get(name) or 1) > 1 for name in ("tensor_parallel_size", "num_devices")):
            logger.warning(
                "vision_tower: tensor_parallel_size is dropped; the vision tower runs on one device"
            )
        vt = {k: v for k, v in vt.items() if k not in ("tensor_parallel_size", "num_devices")}
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
