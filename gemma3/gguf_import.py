"""Convert a Gemma 3 GGUF (llama.cpp's file format) into a Hugging Face model directory.

    convert_gguf("gemma-3-270m-q4_k_m.gguf", "gemma3-270m")   # then from_pretrained("gemma3-270m")

The directory holds ``config.json`` (``gemma3_text``), ``generation_config.json``,
``model.safetensors`` (weights dequantised to fp32, or bf16), ``tokenizer.json``,
``tokenizer_config.json`` and ``gguf_conversion.json`` (where it came from).

What llama.cpp's converter changed is undone here:

* shapes: GGUF lists dimensions innermost first (``ne``); a tensor of ``ne = [640, 1024]`` is
  the ``(1024, 640)`` matrix of PyTorch;
* norms: it stores Gemma's RMSNorm weights with 1 added (Gemma computes ``x * (1 + w)``), so 1
  is subtracted back;
* names: ``blk.N.attn_q.weight`` is ``model.layers.N.self_attn.q_proj.weight`` and so on;
* the config: values Gemma 3 fixes are not in the file (local RoPE base 10000, one global layer
  in six, ``query_pre_attn_scalar = head_dim``, gelu-tanh, tied embeddings, no soft-capping);
* the tokenizer: the file has the SentencePiece vocabulary (tokens, scores, types) but no
  merges; we build the same ``tokenizers`` BPE that transformers builds from a Gemma GGUF.

The GGUF header is parsed here (it is small and simple, and a bad file then gets an error
naming the offset and field); quantised blocks are dequantised by the ``gguf`` package.
Nothing is written until the file and its tensors check out, and the output directory
appears whole (written beside it, renamed at the end) or not at all.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import struct

import ml_dtypes
import numpy as np

from .atomic import new_directory
from .config import FULL, SLIDING, Gemma3TextConfig
from .tokenizer import GEMMA3_CHAT_TEMPLATE
from .weights import expected_shapes, write_safetensors

CONVERTER_VERSION = 1  # bump when the output changes: cached conversions are redone
MARKER = "gguf_conversion.json"
OUTPUT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors",
    MARKER,
)
GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
SLIDING_WINDOW_PATTERN = 6  # Gemma 3: five local layers, then one global
LOCAL_ROPE_BASE = 10_000.0
GLOBAL_ROPE_BASE = 1_000_000.0
EXTRA_HINT = "pip install 'npu-gemma3[model]'"


class GGUFError(ValueError):
    """A GGUF file that cannot be read, or that is not a Gemma 3 text model we can convert."""


# ---------------------------------------------------------------------------- reading a GGUF

# GGUF metadata value types: id -> (struct format, size); 8 is a string, 9 an array.
_SCALARS = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
_NUMPY = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY = 8, 9

# GGML tensor types read without the gguf package: id -> (name, block size, bytes per block).
_FLOAT_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2)}


def _ggml_type(type_id: int) -> tuple[str, int, int] | None:
    """(name, block size, bytes per block) of a GGML tensor type, or None if unknown."""
    if type_id in _FLOAT_TYPES:
        return _FLOAT_TYPES[type_id]
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:
        return None
    try:
        qtype = GGMLQuantizationType(type_id)
    except ValueError:
        return None
    if qtype not in GGML_QUANT_SIZES:
        return None
    block, size = GGML_QUANT_SIZES[qtype]
    return qtype.name, block, size


class GGUFTensorInfo:
    """One tensor of a GGUF: name, ``ne`` (innermost dimension first), type and byte range."""

    def __init__(self, name: str, ne: tuple[int, ...], type_id: int, offset: int):
        self.name, self.ne, self.type_id, self.offset = name, ne, type_id, offset
        self.type_name, self.nbytes = f"type {type_id}", None
        info = _ggml_type(type_id)
        if info is not None:
            self.type_name, block, size = info
            if ne and ne[0] % block == 0:
                self.nbytes = math.prod(ne) // block * size

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape in PyTorch / NumPy order (outermost first)."""
        return tuple(reversed(self.ne))

    def __repr__(self):
        return f"{self.name} ({self.type_name}, ne {list(self.ne)})"


class GGUFFile:
    """A GGUF file's metadata (``metadata``: key -> value) and tensors (``tensors``: name -> info).

    Arrays of numbers are NumPy arrays, arrays of strings lists. Tensor data is memory-mapped
    when first read. Every problem raises ``GGUFError`` naming the file and what is wrong."""

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: no such GGUF file")
        self.size = os.path.getsize(self.path)
        if self.size < 24:
            raise GGUFError(
                f"{self.path}: {self.size} bytes is too short for a GGUF file (header alone is 24)"
            )
        with open(self.path, "rb") as f:
            magic = f.read(4)
            if magic != GGUF_MAGIC:
                raise GGUFError(f"{self.path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                self._buf, self._pos = buf, 4
                try:
                    self._parse()
                finally:
                    self._buf = None
        self._data = None

    # The header is read with a cursor; every read is bounds-checked.

    def _take(self, n: int, what: str) -> int:
        pos = self._pos
        if n < 0 or pos + n > self.size:
            raise GGUFError(
                f"{self.path}: truncated or corrupt: {what} at byte {pos} needs {n} bytes, "
                f"the file has {self.size}"
            )
        self._pos = pos + n
        return pos

    def _scalar(self, type_id: int, what: str):
        fmt, n = _SCALARS[type_id]
        return struct.unpack_from(fmt, self._buf, self._take(n, what))[0]

    def _string(self, what: str) -> str:
        n = self._scalar(10, f"length of {what}")
        raw = self._buf[self._take(n, what) : self._pos]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"{self.path}: {what} is not UTF-8 ({e})") from None

    def _value(self, type_id: int, what: str):
        if type_id in _SCALARS:
            return self._scalar(type_id, what)
        if type_id == _STRING:
            return self._string(what)
        if type_id == _ARRAY:
            item_type = self._scalar(4, f"item type of {what}")
            count = self._scalar(10, f"length of {what}")
            if item_type in _NUMPY:
                size = _SCALARS[item_type][1]
                start = self._take(count * size, f"{count} items of {what}")
                return np.frombuffer(self._buf, dtype=_NUMPY[item_type], count=count, offset=start).copy()
            if item_type == _STRING:
                if count * 8 > self.size - self._pos:
                    self._take(count * 8, f"{count} strings of {what}")
                return [self._string(f"{what}[{i}]") for i in range(count)]
            if item_type == _ARRAY:
                return [self._value(_ARRAY, f"{what}[{i}]") for i in range(count)]
            raise GGUFError(f"{self.path}: {what} is an array of unknown value type {item_type}")
        raise GGUFError(f"{self.path}: {what} has unknown value type {type_id} (byte {self._pos - 4})")

    def _parse(self):
        version = self._scalar(4, "version")
        if version & 0xFFFF == 0 and version:
            raise GGUFError(f"{self.path}: a big-endian GGUF; only little-endian files are read")
        if version not in (2, 3):
            raise GGUFError(f"{self.path}: GGUF version {version} is not supported (2 and 3 are)")
        self.version = version
        n_tensors = self._scalar(10, "tensor count")
        n_kv = self._scalar(10, "metadata count")
        # Each metadata entry and tensor needs well over 8 bytes: a huge count is a corrupt file.
        if (n_tensors + n_kv) * 8 > self.size:
            raise GGUFError(
                f"{self.path}: corrupt header: {n_tensors} tensors and {n_kv} metadata entries "
                f"cannot fit in {self.size} bytes"
            )
        self.metadata: dict[str, object] = {}
        for i in range(n_kv):
            key = self._string(f"metadata key #{i}")
            type_id = self._scalar(4, f"value type of {key!r}")
            self.metadata[key] = self._value(type_id, f"metadata {key!r}")
        infos = []
        for i in range(n_tensors):
            name = self._string(f"name of tensor #{i}")
            n_dims = self._scalar(4, f"dimension count of tensor {name!r}")
            if not 1 <= n_dims <= 4:
                raise GGUFError(f"{self.path}: tensor {name!r} has {n_dims} dimensions (1 to 4 expected)")
            ne = tuple(self._scalar(10, f"dimensions of tensor {name!r}") for _ in range(n_dims))
            type_id = self._scalar(4, f"type of tensor {name!r}")
            offset = self._scalar(10, f"data offset of tensor {name!r}")
            infos.append((name, ne, type_id, offset))
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(f"{self.path}: general.alignment {alignment!r} is not a power of two")
        self.data_start = -(-self._pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, ne, type_id, offset in infos:
            if name in self.tensors:
                raise GGUFError(f"{self.path}: tensor {name!r} appears twice")
            self.tensors[name] = GGUFTensorInfo(name, ne, type_id, self.data_start + offset)
        self._check_tensor_bytes()

    def _check_tensor_bytes(self):
        problems = []
        for t in self.tensors.values():
            if t.nbytes is None:
                continue  # an unknown type or a bad row length: reported when the tensor is used
            if t.offset + t.nbytes > self.size:
                problems.append(
                    f"{t!r} needs bytes {t.offset}..{t.offset + t.nbytes}, past the end of the file"
                )
        if problems:
            raise GGUFError(
                f"{self.path}: truncated ({self.size} bytes): {len(problems)} tensor(s) lie past its end: "
                + "; ".join(problems[:5])
                + (" ..." if len(problems) > 5 else "")
            )

    # Tensor data.

    def tensor_problem(self, t: GGUFTensorInfo) -> str | None:
        """Why a tensor cannot be dequantised, or None."""
        info = _ggml_type(t.type_id)
        if info is None:
            try:
                import gguf  # noqa: F401
            except ImportError:
                return f"{t!r}: dequantising GGML type {t.type_id} needs the gguf package ({EXTRA_HINT})"
            return f"{t!r}: unknown GGML tensor type {t.type_id}"
        name, block, _ = info
        if t.ne[0] % block:
            return f"{t!r}: rows of {t.ne[0]} values do not fill whole {name} blocks of {block}"
        if t.type_id not in _FLOAT_TYPES:
            import gguf.quants
            from gguf.constants import GGMLQuantizationType

            traits = getattr(gguf.quants, "_type_traits", None)  # the types gguf can dequantise
            if traits is not None and GGMLQuantizationType(t.type_id) not in traits:
                return f"{t!r}: the gguf package cannot dequantise {name}"
        return None

    def float32(self, name: str) -> np.ndarray:
        """The tensor dequantised to fp32, in PyTorch order."""
        t = self.tensors[name]
        problem = self.tensor_problem(t)
        if problem:
            raise GGUFError(f"{self.path}: {problem}")
        if not t.nbytes:
            return np.zeros(t.shape, np.float32)
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        rows = math.prod(t.ne[1:])
        raw = self._data[t.offset : t.offset + t.nbytes].reshape(rows, t.nbytes // rows)
        if t.type_id == 0:
            out = raw.view("<f4").astype(np.float32)
        elif t.type_id == 1:
            out = raw.view("<f2").astype(np.float32)
        elif t.type_id == 30:
            out = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            from gguf.constants import GGMLQuantizationType
            from gguf.quants import dequantize

            try:
                out = dequantize(np.asarray(raw), GGMLQuantizationType(t.type_id))
            except (NotImplementedError, ValueError) as e:
                raise GGUFError(f"{self.path}: {t!r}: cannot dequantise ({e})") from None
            out = np.asarray(out, dtype=np.float32)
        return out.reshape(t.shape)


# ---------------------------------------------------------------------------- the config


def _meta(g: GGUFFile, problems: list, key: str, kind, default=None, required=True):
    """A metadata value of the right kind (a per-layer array must hold one value), or default."""
    if key not in g.metadata:
        if required:
            problems.append(f"missing {key}")
        return default
    v = g.metadata[key]
    if isinstance(v, np.ndarray) and v.ndim == 1 and v.size:
        if (v != v[0]).any():
            problems.append(f"{key} varies across layers ({v.tolist()}); Gemma 3 uses one value")
            return default
        v = v[0].item()
    if kind is int and isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return int(v)
    if kind is float and isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
        return float(v)
    if kind is str and isinstance(v, str):
        return v
    problems.append(f"{key} is {v!r}, expected {kind.__name__}")
    return default


def gemma3_config(g: GGUFFile) -> dict:
    """``config.json`` (model_type gemma3_text) from the file's ``gemma3.*`` metadata."""
    arch = g.metadata.get("general.architecture")
    if arch != "gemma3":
        raise GGUFError(
            f"{g.path}: general.architecture is {arch!r}, not 'gemma3': only Gemma 3 text models are converted"
        )
    p: list[str] = []
    hidden = _meta(g, p, "gemma3.embedding_length", int)
    layers = _meta(g, p, "gemma3.block_count", int)
    ffn = _meta(g, p, "gemma3.feed_forward_length", int)
    heads = _meta(g, p, "gemma3.attention.head_count", int)
    kv_heads = _meta(g, p, "gemma3.attention.head_count_kv", int, heads, required=False)
    context = _meta(g, p, "gemma3.context_length", int)
    window = _meta(g, p, "gemma3.attention.sliding_window", int)
    head_dim = None
    if hidden and heads:
        head_dim = _meta(g, p, "gemma3.attention.key_length", int, hidden // heads, required=False)
        value_dim = _meta(g, p, "gemma3.attention.value_length", int, head_dim, required=False)
        if value_dim != head_dim:
            p.append(f"gemma3.attention.value_length {value_dim} differs from key_length {head_dim}")
    eps = _meta(g, p, "gemma3.attention.layer_norm_rms_epsilon", float, 1e-6, required=False)
    theta = _meta(g, p, "gemma3.rope.freq_base", float, GLOBAL_ROPE_BASE, required=False)
    scaling = None
    kind = _meta(g, p, "gemma3.rope.scaling.type", str, "none", required=False)
    if kind == "linear":
        scaling = {"rope_type": "linear", "factor": _meta(g, p, "gemma3.rope.scaling.factor", float, 1.0)}
    elif kind != "none":
        p.append(f"gemma3.rope.scaling.type {kind!r} is not supported (linear is)")
    softcap = _meta(g, p, "gemma3.final_logit_softcapping", float, None, required=False)
    vocab = g.tensors["token_embd.weight"].ne[-1] if "token_embd.weight" in g.tensors else None
    if vocab is None:
        p.append("missing tensor token_embd.weight (the embedding)")
    if p:
        raise GGUFError(f"{g.path}: Gemma 3 metadata problems: " + "; ".join(p))
    tok = g.metadata
    d = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": context,
        "sliding_window": window,
        "sliding_window_pattern": SLIDING_WINDOW_PATTERN,
        "layer_types": [FULL if (i + 1) % SLIDING_WINDOW_PATTERN == 0 else SLIDING for i in range(layers)],
        "rope_theta": theta,
        "rope_local_base_freq": LOCAL_ROPE_BASE,
        "rope_scaling": scaling,
        "query_pre_attn_scalar": head_dim,
        "rms_norm_eps": eps,
        "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": softcap,
        "attn_logit_softcapping": None,
        "attention_bias": any(n.endswith(".bias") for n in g.tensors),
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "bos_token_id": int(tok.get("tokenizer.ggml.bos_token_id", 2)),
        "eos_token_id": int(tok.get("tokenizer.ggml.eos_token_id", 1)),
        "pad_token_id": int(tok.get("tokenizer.ggml.padding_token_id", 0)),
        "torch_dtype": "float32",
    }
    try:
        Gemma3TextConfig.from_dict(d, f"{g.path} (metadata)")
    except NotImplementedError as e:
        raise GGUFError(str(e)) from None
    return d


# ---------------------------------------------------------------------------- the weights

_LAYER = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None if it is not a Gemma 3 text tensor."""
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER:
        return f"model.layers.{int(parts[1])}.{_LAYER[parts[2]]}"
    return None


def is_norm(gguf_name: str) -> bool:
    """Stored with +1 by llama.cpp's Gemma converter."""
    return gguf_name.endswith("norm.weight")


def tensor_plan(g: GGUFFile, cfg: Gemma3TextConfig) -> dict[str, str]:
    """HF name -> GGUF name for every tensor; one GGUFError lists every missing, unexpected,
    mis-shaped or unreadable tensor."""
    expected = {"model." + k: v for k, v in expected_shapes(cfg).items()}
    if not cfg.tie_word_embeddings:
        expected["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    plan, unexpected, misshaped, unreadable = {}, [], [], []
    for name, t in g.tensors.items():
        hf = hf_name(name)
        if hf is None or hf not in expected:
            unexpected.append(repr(t))
            continue
        plan[hf] = name
        if t.shape != expected[hf]:
            misshaped.append(f"{t!r} is {t.shape} in PyTorch order, {hf} should be {expected[hf]}")
        problem = g.tensor_problem(t)
        if problem:
            unreadable.append(problem)
    missing = [f"{hf} ({_gguf_name(hf)})" for hf in expected if hf not in plan]
    if missing or unexpected or misshaped or unreadable:
        parts = [f"{g.path}: the tensors do not match a Gemma 3 model of this config"]
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped", misshaped),
            ("unreadable", unreadable),
        ):
            if items:
                parts.append(
                    f"{label} ({len(items)}): " + "; ".join(items[:12]) + (" ..." if len(items) > 12 else "")
                )
        raise GGUFError("\n  ".join(parts))
    return plan


def _gguf_name(hf: str) -> str:
    for k, v in _GLOBAL.items():
        if v == hf:
            return k
    _, _, layer, short = hf.split(".", 3)
    return f"blk.{layer}." + next(k for k, v in _LAYER.items() if v == short)


def gguf_weights(g: GGUFFile, plan: dict[str, str], dtype: str = "float32"):
    """Yield (HF name, array) for every tensor, dequantised, norms with their +1 removed."""
    for hf, name in plan.items():
        w = g.float32(name)
        if is_norm(name):
            w = w - np.float32(1.0)
        yield hf, (w.astype(ml_dtypes.bfloat16) if dtype == "bfloat16" else w)


# ---------------------------------------------------------------------------- the tokenizer

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types (1 normal, 2 unknown, 6 byte)


def _token_field(g: GGUFFile, key: str, n: int, default):
    v = g.metadata.get(key)
    if v is None:
        return default
    if len(v) != n:
        raise GGUFError(f"{g.path}: {key} has {len(v)} entries, tokenizer.ggml.tokens has {n}")
    return v


def gemma_tokenizer(g: GGUFFile):
    """(tokenizers.Tokenizer, tokenizer_config dict) from the GGUF vocabulary.

    This is the tokenizer transformers builds from a Gemma GGUF (``gemma_tokenizer`` in
    ``transformers.integrations.gguf``) and what Gemma's own ``tokenizer.json`` is: BPE with
    byte fallback (``<0xXX>`` tokens) over text whose spaces became U+2581, no prefix space,
    ``<bos>`` added in front, control tokens special and user-defined ones (``\\n\\n``, ``<td>``)
    matched whole. The file has no merges: they are rebuilt from the vocabulary, each token
    split into two tokens, best-first in the order the tokens appear in the file.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    meta = g.metadata
    model = meta.get("tokenizer.ggml.model")
    if model != "llama":
        raise GGUFError(
            f"{g.path}: tokenizer.ggml.model is {model!r}; a Gemma tokenizer is SentencePiece ('llama')"
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise GGUFError(f"{g.path}: tokenizer.ggml.tokens is missing or not a list of strings")
    n = len(tokens)
    types = [int(t) for t in _token_field(g, "tokenizer.ggml.token_type", n, np.ones(n, np.int32))]
    if meta.get("tokenizer.ggml.add_space_prefix", False):
        raise GGUFError(f"{g.path}: tokenizer.ggml.add_space_prefix is true; Gemma 3 adds no space prefix")

    def special(key, default):
        i = meta.get(f"tokenizer.ggml.{key}", default)
        if not isinstance(i, (int, np.integer)) or not 0 <= i < n:
            raise GGUFError(f"{g.path}: tokenizer.ggml.{key} {i!r} is not a token id (0..{n - 1})")
        return tokens[int(i)]

    bos, eos = special("bos_token_id", 2), special("eos_token_id", 1)
    unk, pad = special("unknown_token_id", 3), special("padding_token_id", 0)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))

    # A token of spaces only is stored with real spaces; the normalizer turns spaces into U+2581.
    spelled = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    else:
        merges = []
        for t in {t: -i for i, t in enumerate(spelled)}:  # best first: file order, longest left piece
            for k in range(len(t) - 1, 0, -1):
                if t[:k] in vocab and t[k:] in vocab:
                    merges.append((t[:k], t[k:]))
    if unk not in vocab:
        raise GGUFError(f"{g.path}: the unknown token {unk!r} is not in the vocabulary")
    tok = Tokenizer(
        BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True, dropout=None)
    )
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    ids = [(t, vocab[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=ids)
    tok.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types) if ty == CONTROL]
    )
    tok.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types)
            if ty == USER_DEFINED and t in vocab
        ]
    )
    template = meta.get("tokenizer.chat_template")
    config = {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": pad,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get("gemma3.context_length", 131072)),
        "chat_template": template if isinstance(template, str) and template else GEMMA3_CHAT_TEMPLATE,
    }
    return tok, config


def generation_config(g: GGUFFile, tokens: list[str]) -> dict:
    """eos is <eos> and <end_of_turn> (a chat turn ends with it), as Gemma 3's own file says."""
    eos = [int(g.metadata.get("tokenizer.ggml.eos_token_id", 1))]
    if "<end_of_turn>" in tokens and tokens.index("<end_of_turn>") not in eos:
        eos.append(tokens.index("<end_of_turn>"))
    return {
        "bos_token_id": int(g.metadata.get("tokenizer.ggml.bos_token_id", 2)),
        "eos_token_id": eos,
        "pad_token_id": int(g.metadata.get("tokenizer.ggml.padding_token_id", 0)),
    }


# ---------------------------------------------------------------------------- converting


def convert_gguf(gguf_path, out_dir, *, dtype: str = "float32", overwrite: bool = False) -> str:
    """Convert a Gemma 3 GGUF into a Hugging Face directory ``out_dir``; return ``out_dir``.

    ``dtype`` is ``"float32"`` (exact: every dequantised value is an fp32) or ``"bfloat16"``
    (half the size, rounded). An existing non-empty ``out_dir`` is replaced only with
    ``overwrite=True``. On any error nothing is left behind."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    target = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(target):
        if not os.path.isdir(target):
            raise FileExistsError(f"{out_dir}: exists and is not a directory")
        if os.listdir(target) and not overwrite:
            raise FileExistsError(
                f"{out_dir}: exists and is not empty (pass overwrite / --force to replace it)"
            )
    g = GGUFFile(gguf_path)
    config = gemma3_config(g)
    cfg = Gemma3TextConfig.from_dict(config, f"{g.path} (metadata)")
    plan = tensor_plan(g, cfg)
    tokenizer, tokenizer_config = gemma_tokenizer(g)
    tokens = g.metadata["tokenizer.ggml.tokens"]
    if len(tokens) > cfg.vocab_size:
        raise GGUFError(
            f"{g.path}: {len(tokens)} tokens but the embedding token_embd.weight has {cfg.vocab_size} rows"
        )
    config["torch_dtype"] = dtype
    parent = os.path.dirname(target)
    made_parent = not os.path.isdir(parent)
    os.makedirs(parent, exist_ok=True)
    try:
        with new_directory(target, prefix=".converting-") as tmp:
            _write_json(os.path.join(tmp, "config.json"), config)
            _write_json(os.path.join(tmp, "generation_config.json"), generation_config(g, tokens))
            tokenizer.save(os.path.join(tmp, "tokenizer.json"))
            _write_json(os.path.join(tmp, "tokenizer_config.json"), tokenizer_config)
            weights = dict(gguf_weights(g, plan, dtype))
            write_safetensors(os.path.join(tmp, "model.safetensors"), weights, {"format": "pt"})
            del weights
            _write_json(
                os.path.join(tmp, MARKER),
                {
                    "converter_version": CONVERTER_VERSION,
                    "gguf_file": os.path.basename(g.path),
                    "gguf_bytes": g.size,
                    "general.name": g.metadata.get("general.name"),
                    "general.file_type": g.metadata.get("general.file_type"),
                    "tensor_types": sorted({t.type_name for t in g.tensors.values()}),
                    "dtype": dtype,
                },
            )
    except BaseException:
        if made_parent:
            with contextlib.suppress(OSError):
                os.rmdir(parent)
        raise
    return out_dir


def is_converted(directory, version: int = CONVERTER_VERSION) -> bool:
    """A complete conversion by this converter version."""
    directory = os.fspath(directory)
    if not all(os.path.isfile(os.path.join(directory, f)) for f in OUTPUT_FILES):
        return False
    try:
        with open(os.path.join(directory, MARKER)) as f:
            return json.load(f).get("converter_version") == version
    except (OSError, ValueError):
        return False


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
