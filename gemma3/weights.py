"""Checkpoint weights: safetensors files (single or sharded), read without torch, never pickle.

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype,
shape, byte offsets) and the raw tensors. We read the header and memory-map the data, so a
tensor costs memory only when it is converted; bf16 is widened to fp32 by a bit shift.
``write_safetensors`` writes the same format (atomically) for our compiled artefacts.
"""

from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from .atomic import new_file
from .config import Gemma3TextConfig

DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype("<f8"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    "U8": np.dtype("u1"),
}
NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file or its tensors are not what the model needs."""


class SafetensorsFile:
    """One .safetensors file: its header, and tensors memory-mapped on demand."""

    def __init__(self, path):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{self.path}: {size} bytes is too short for a safetensors file")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise CheckpointError(f"{self.path}: header length {n} exceeds the file size {size}")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path}: the safetensors header is not JSON ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.data_start = 8 + n
        self.tensors = {}
        for name, info in header.items():
            dtype = info.get("dtype")
            if dtype not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype!r}")
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
            if end - begin != math.prod(shape) * DTYPES[dtype].itemsize or self.data_start + end > size:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} {dtype} {shape} has byte range {begin}..{end} that "
                    f"does not match its size or the file ({size} bytes)"
                )
            self.tensors[name] = (dtype, shape, begin)
        self._map = None

    def shape(self, name: str) -> tuple:
        return self.tensors[name][1]

    def raw(self, name: str) -> np.ndarray:
        """The tensor as stored (memory-mapped, read-only)."""
        dtype, shape, begin = self.tensors[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        count = math.prod(shape)
        start = self.data_start + begin
        return self._map[start : start + count * DTYPES[dtype].itemsize].view(DTYPES[dtype]).reshape(shape)

    def float32(self, name: str) -> np.ndarray:
        a = self.raw(name)
        if a.dtype == DTYPES["BF16"]:
            # bf16 is the top half of an fp32: widen by shifting the bits.
            return (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        return a.astype(np.float32)


class Checkpoint:
    """All tensors of a model directory: model.safetensors or a sharded index."""

    def __init__(self, directory):
        self.directory = os.fspath(directory)
        index = os.path.join(self.directory, "model.safetensors.index.json")
        single = os.path.join(self.directory, "model.safetensors")
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            for name, shard in weight_map.items():
                if shard not in self.files:
                    path = os.path.join(self.directory, shard)
                    if not os.path.exists(path):
                        raise CheckpointError(f"{index}: shard {shard!r} (for {name!r}) does not exist")
                    self.files[shard] = SafetensorsFile(path)
                if name not in self.files[shard].tensors:
                    raise CheckpointError(f"{index}: {name!r} is not in shard {shard!r}")
                self.where[name] = shard
        elif os.path.exists(single):
            self.files["model.safetensors"] = SafetensorsFile(single)
            self.where = {n: "model.safetensors" for n in self.files["model.safetensors"].tensors}
        else:
            pickles = [f for f in os.listdir(self.directory) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            hint = (
                f" (found {pickles}: pickle files are never loaded; convert them to safetensors)"
                if pickles
                else ""
            )
            raise CheckpointError(
                f"{self.directory}: no model.safetensors or model.safetensors.index.json{hint}"
            )

    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple:
        return self.files[self.where[name]].shape(name)

    def float32(self, name: str) -> np.ndarray:
        return self.files[self.where[name]].float32(name)


# Prefixes under which a text model's tensors appear: Gemma3ForCausalLM, and the language
# model inside Gemma3ForConditionalGeneration (transformers 4.x and 5.x layouts).
PREFIXES = ("model.", "language_model.model.", "model.language_model.")


def expected_shapes(c: Gemma3TextConfig) -> dict[str, tuple]:
    """Name -> shape of every tensor the text model needs (names without the prefix)."""
    d, f, hd = c.hidden_size, c.intermediate_size, c.head_dim
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    shapes = {"embed_tokens.weight": (c.vocab_size, d), "norm.weight": (d,)}
    for i in range(c.num_hidden_layers):
        p = f"layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
                p + "pre_feedforward_layernorm.weight": (d,),
                p + "post_feedforward_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (q, d),
                p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.v_proj.weight": (kv, d),
                p + "self_attn.o_proj.weight": (d, q),
                p + "self_attn.q_norm.weight": (hd,),
                p + "self_attn.k_norm.weight": (hd,),
                p + "mlp.gate_proj.weight": (f, d),
                p + "mlp.up_proj.weight": (f, d),
                p + "mlp.down_proj.weight": (d, f),
            }
        )
        if c.attention_bias:
            for proj, n in (("q_proj", q), ("k_proj", kv), ("v_proj", kv), ("o_proj", d)):
                shapes[p + f"self_attn.{proj}.bias"] = (n,)
    return shapes


def text_weights(
    ckpt: Checkpoint,
    c: Gemma3TextConfig,
    *,
    allow_extra_prefixes=(
        "vision_tower.",
        "multi_modal_projector.",
        "model.vision_tower.",
        "model.multi_modal_projector.",
    ),
) -> dict[str, str]:
    """Map every expected tensor to its name in the checkpoint, checking names and shapes.

    Raises one CheckpointError listing all missing, unexpected and mis-shaped tensors (and
    which of the mis-shaped ones look transposed)."""
    expected = expected_shapes(c)
    found: dict[str, str] = {}
    unexpected = []
    for name in ckpt.names():
        if name.startswith(allow_extra_prefixes):
            continue
        if name == "lm_head.weight" or name.endswith(".lm_head.weight"):
            if not c.tie_word_embeddings:
                found["lm_head.weight"] = name
            continue  # tied: the embedding serves as the LM head (a saved copy is ignored)
        short = next((name[len(p) :] for p in PREFIXES if name.startswith(p)), None)
        if short in expected:
            found[short] = name
        else:
            unexpected.append(name)
    if not c.tie_word_embeddings:
        expected["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    missing = sorted(set(expected) - set(found))
    misshaped = [
        m for short, name in found.items() if (m := shape_mismatch(name, ckpt.shape(name), expected[short]))
    ]
    check_tensors(f"checkpoint {ckpt.directory} does not match the config", missing, unexpected, misshaped)
    return found


def shape_mismatch(name: str, got, want: tuple) -> str | None:
    """None when a tensor has the expected shape, else a line naming it (and whether it looks
    transposed)."""
    got = tuple(got)
    if got == want:
        return None
    note = " (transposed)" if got == tuple(reversed(want)) else ""
    return f"{name}: {got}, expected {want}{note}"


def check_tensors(what: str, missing, unexpected, misshaped) -> None:
    """One CheckpointError listing every missing, unexpected and mis-shaped tensor, if any."""
    if not (missing or unexpected or misshaped):
        return
    parts = [what]
    if missing:
        parts.append(f"missing ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}")
    if unexpected:
        parts.append(f"unexpected ({len(unexpected)}): {sorted(unexpected)[:20]}")
    if misshaped:
        parts.append(f"mis-shaped ({len(misshaped)}): " + "; ".join(misshaped[:20]))
    raise CheckpointError("\n  ".join(parts))


def write_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write tensors (fp32, fp16, bf16 via ml_dtypes, int) as safetensors, atomically."""
    path = os.fspath(path)
    header, offset, arrays = {}, 0, []
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        if a.dtype not in NAMES:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {a.dtype}, which safetensors cannot hold here"
            )
        header[name] = {
            "dtype": NAMES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
        arrays.append(a)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
    with new_file(path, suffix=".safetensors") as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())
