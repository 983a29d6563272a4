"""Generation with Hugging Face semantics: settings, logits warpers, the decoding loop.

Settings come from ``generation_config.json`` first, then the model config (bos/eos/pad ids),
then the ``generation_config`` argument, then keyword arguments, as ``transformers`` does.
The loop is model-agnostic: it calls ``prefill(input_ids, attention_mask) -> (B, V) logits of
the last position`` once and ``decode(tokens (B,)) -> (B, V) logits`` per new token.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields

import numpy as np


@dataclass
class GenerationSettings:
    max_new_tokens: int | None = None
    max_length: int | None = None  # prompt + new tokens; transformers' default is 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50  # 0 or None: no top-k filtering
    top_p: float = 1.0
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    seed: int | None = None  # reproducible sampling
    return_dict_in_generate: bool = False
    output_logits: bool = False
    output_scores: bool = False

    @classmethod
    def merge(cls, *sources: dict | None) -> GenerationSettings:
        """Later sources override earlier ones; unknown keys are ignored, as transformers
        keeps them on the GenerationConfig without using them here."""
        known = {f.name for f in fields(cls)}
        merged: dict = {}
        for s in sources:
            for k, v in (s or {}).items():
                if k in known and v is not None:
                    merged[k] = v
        eos = merged.get("eos_token_id", [])
        merged["eos_token_id"] = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
        s = cls(**merged)
        s.validate()
        return s

    def validate(self):
        for name in ("max_new_tokens", "max_length", "top_k"):
            v = getattr(self, name)
            if v is not None and (
                not isinstance(v, (int, np.integer)) or v < (1 if name == "max_length" else 0)
            ):
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    def new_tokens(self, prompt_len: int) -> int:
        if self.max_new_tokens is not None:
            return int(self.max_new_tokens)
        return max(0, (self.max_length or 20) - prompt_len)


def read_generation_config(directory) -> dict:
    path = os.path.join(os.fspath(directory), "generation_config.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def to_dict(generation_config) -> dict:
    """A dict from None, a dict, or an object with ``to_dict`` (transformers' GenerationConfig)."""
    if generation_config is None:
        return {}
    if isinstance(generation_config, dict):
        return dict(generation_config)
    if hasattr(generation_config, "to_dict"):
        return generation_config.to_dict()
    raise TypeError(
        f"generation_config must be a dict or GenerationConfig, got {type(generation_config).__name__}"
    )


# ---------------------------------------------------------------- logits warpers (as transformers)


def warp(logits: np.ndarray, s: GenerationSettings) -> np.ndarray:
    """Temperature, then top-k, then top-p, on (B, V) float logits; removed entries -> -inf."""
    x = logits.astype(np.float32, copy=True)
    if s.temperature != 1.0:
        x /= np.float32(s.temperature)
    if s.top_k is not None and 0 < s.top_k < x.shape[-1]:
        kth = np.partition(x, -s.top_k, axis=-1)[:, -s.top_k][:, None]
        x[x < kth] = -np.inf
    if s.top_p < 1.0:
        order = np.argsort(x, axis=-1, kind="stable")  # ascending, as transformers sorts
        sorted_x = np.take_along_axis(x, order, axis=-1)
        probs = _softmax(sorted_x)
        cum = np.cumsum(probs, axis=-1)
        remove = cum <= (1 - s.top_p)
        remove[:, -1] = False  # keep at least one token
        rows = np.arange(x.shape[0])[:, None]
        x[rows, order] = np.where(remove, -np.inf, sorted_x)
    return x


def _softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis=-1, keepdims=True)


def choose(
    logits: np.ndarray, s: GenerationSettings, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Next tokens (B,) and the processed scores (B, V)."""
    if not s.do_sample:
        return np.argmax(logits, axis=-1), logits
    scores = warp(logits, s)
    probs = _softmax(scores.astype(np.float64))
    u = rng.random((probs.shape[0], 1))
    tokens = np.minimum((np.cumsum(probs, axis=-1) < u).sum(axis=-1), probs.shape[-1] - 1)
    return tokens, scores


# ---------------------------------------------------------------- the loop


@dataclass
class GenerateOutput:
    """What ``generate(..., return_dict_in_generate=True)`` returns, as transformers' output."""

    sequences: object
    logits: tuple | None = None
    scores: tuple | None = None

    def __getitem__(self, key):
        if isinstance(key, (int, slice)):  # transformers' ModelOutput: the fields that are set, in order
            return self.to_tuple()[key]
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def keys(self) -> list[str]:
        """The fields that are set (not None), in order, as transformers' ModelOutput."""
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, k) for k in self.keys())


def generate_loop(
    prefill, decode, input_ids: np.ndarray, attention_mask: np.ndarray, s: GenerationSettings, streamer=None
):
    """Run prefill once and decode until every sequence ended or the budget is spent.

    Returns (sequences (B, T + n) int64, raw logits per step, processed scores per step)."""
    batch, prompt_len = input_ids.shape
    n_new = s.new_tokens(prompt_len)
    rng = np.random.default_rng(s.seed)
    pad = s.pad_token_id if s.pad_token_id is not None else (s.eos_token_id[0] if s.eos_token_id else 0)
    eos = np.array(s.eos_token_id, np.int64)
    sequences = [input_ids.astype(np.int64)]
    raw_logits, scores = [], []
    done = np.zeros(batch, bool)
    if streamer is not None:
        streamer.put(input_ids.astype(np.int64))
    logits = prefill(input_ids, attention_mask) if n_new > 0 else None
    for step in range(n_new):
        tokens, processed = choose(logits, s, rng)
        tokens = np.where(done, pad, tokens).astype(np.int64)
        raw_logits.append(logits)
        scores.append(processed)
        sequences.append(tokens[:, None])
        if streamer is not None:
            streamer.put(tokens)
        done |= np.isin(tokens, eos)
        if done.all() or step == n_new - 1:
            break
        logits = decode(tokens)
    if streamer is not None:
        streamer.end()
    return np.concatenate(sequences, axis=1), tuple(raw_logits), tuple(scores)
