"""Generation with Hugging Face semantics: settings, logits processors and warpers, the decoding loop.

Settings come from the model config (bos/eos/pad ids), then ``generation_config.json``, then the
``generation_config`` argument, then keyword arguments, as ``transformers`` does. An option that
would change the tokens and is not implemented here raises NotImplementedError (``NOT_IMPLEMENTED``).
The loop is model-agnostic: it calls ``prefill(input_ids, attention_mask) -> (B, V) logits of
the last position`` once and ``decode(tokens (B,)) -> (B, V) logits`` per new token.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields

import numpy as np

# Options of transformers' GenerationConfig, and keywords of its ``generate``, that change the tokens and that
# this loop does not implement: name -> (does this value act?, what it asks for, the value that turns it off).
# The test of each follows transformers' ``_get_logits_processor`` and ``get_generation_mode``, so an inert value
# (num_beams=1, epsilon_cutoff=0.0 or any sampling-only option while decoding greedily, as released checkpoints'
# generation_config.json often carry) is accepted. ``o`` holds every option after merging.
NOT_IMPLEMENTED: dict[str, tuple] = {
    "num_beams": (lambda v, o: v > 1, "beam search", "1"),
    "num_beam_groups": (lambda v, o: v > 1, "group (diverse) beam search", "1"),
    "constraints": (lambda v, o: True, "constrained beam search", "None"),
    "force_words_ids": (lambda v, o: True, "constrained beam search", "None"),
    "penalty_alpha": (
        lambda v, o: v > 0 and not o.get("do_sample") and (o.get("top_k", 50) or 0) > 1,
        "contrastive search",
        "None",
    ),
    "dola_layers": (lambda v, o: True, "DoLa decoding", "None"),
    "assistant_model": (lambda v, o: True, "assisted decoding", "None"),
    "prompt_lookup_num_tokens": (lambda v, o: True, "prompt-lookup (assisted) decoding", "None"),
    "assistant_early_exit": (lambda v, o: True, "early-exit (assisted) decoding", "None"),
    "use_mtp": (lambda v, o: bool(v), "multi-token-prediction (assisted) decoding", "False"),
    "custom_generate": (lambda v, o: True, "a custom decoding method", "None"),
    "num_return_sequences": (lambda v, o: v > 1, "several sequences per prompt", "1"),
    "guidance_scale": (lambda v, o: v != 1, "classifier-free guidance", "None"),
    "sequence_bias": (lambda v, o: bool(v), "a sequence bias", "None"),
    "encoder_repetition_penalty": (lambda v, o: v != 1.0, "an encoder repetition penalty", "1.0"),
    "encoder_no_repeat_ngram_size": (lambda v, o: v > 0, "encoder n-gram blocking", "0"),
    "forced_bos_token_id": (lambda v, o: True, "a forced first token", "None"),
    "forced_eos_token_id": (lambda v, o: True, "a forced last token", "None"),
    "exponential_decay_length_penalty": (lambda v, o: True, "an exponential length penalty", "None"),
    "watermarking_config": (lambda v, o: True, "watermarking", "None"),
    "top_h": (lambda v, o: bool(o.get("do_sample")), "top-h sampling", "None"),
    "epsilon_cutoff": (lambda v, o: bool(o.get("do_sample")) and 0 < v < 1, "epsilon sampling", "0.0"),
    "eta_cutoff": (lambda v, o: bool(o.get("do_sample")) and 0 < v < 1, "eta sampling", "0.0"),
    "stop_strings": (lambda v, o: bool(v), "stopping on strings", "None"),
    "max_time": (lambda v, o: True, "a time limit", "None"),
    "token_healing": (lambda v, o: bool(v), "token healing", "False"),
    "logits_processor": (lambda v, o: len(v) > 0, "custom logits processors", "None"),
    "stopping_criteria": (lambda v, o: len(v) > 0, "custom stopping criteria", "None"),
    "prefix_allowed_tokens_fn": (lambda v, o: True, "prefix-constrained decoding", "None"),
    "negative_prompt_ids": (lambda v, o: True, "classifier-free guidance", "None"),
    "negative_prompt_attention_mask": (lambda v, o: True, "classifier-free guidance", "None"),
    "output_attentions": (
        lambda v, o: bool(v) and bool(o.get("return_dict_in_generate")),
        "attention weights in the output",
        "False",
    ),
    "output_hidden_states": (
        lambda v, o: bool(v) and bool(o.get("return_dict_in_generate")),
        "hidden states in the output",
        "False",
    ),
}

# Options of transformers' GenerationConfig and generate keywords that never change the tokens here: accepted and
# not needed (the cache is the NPU's, beams and assistants are refused above, so their tuning knobs are inert).
INERT = frozenset(
    {
        "use_cache",
        "cache_implementation",
        "cache_config",
        "max_cache_len",
        "early_stopping",
        "length_penalty",
        "diversity_penalty",
        "low_memory",
        "compile_config",
        "disable_compile",
        "continuous_batching_config",
        "prefill_chunk_size",
        "decoder_start_token_id",
        "is_assistant",
        "num_assistant_tokens",
        "num_assistant_tokens_schedule",
        "assistant_confidence_threshold",
        "max_matching_ngram_size",
        "assistant_lookbehind",
        "target_lookbehind",
        "assistant_ensemble_weight",
        "speculation_type",
        "assistant_tokenizer",
        "tokenizer",
        "synced_gpus",
        "trust_remote_code",
        "transformers_version",
        "_from_model_config",
    }
)


@dataclass
class GenerationSettings:
    """transformers' GenerationConfig fields this loop implements, with transformers' global defaults."""

    max_new_tokens: int | None = None
    max_length: int | None = None  # prompt + new tokens; transformers' default is 20
    min_length: int = 0  # prompt (padding included) + new tokens before an eos may come
    min_new_tokens: int | None = None  # new tokens before an eos may come; overrides min_length
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50  # 0 or None: no top-k filtering
    top_p: float = 1.0
    min_p: float | None = None
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    bad_words_ids: list[list[int]] | None = None
    suppress_tokens: list[int] | None = None
    begin_suppress_tokens: list[int] | None = None
    remove_invalid_values: bool = False
    renormalize_logits: bool = False
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    # Sampling draws from np.random.default_rng(seed) when a seed is given (the same tokens for NumPy, list and
    # torch inputs); without one, from torch's global generator for torch inputs (torch.manual_seed(s) repeats a
    # run, as with transformers) and from a freshly seeded NumPy generator otherwise.
    seed: int | None = None
    return_dict_in_generate: bool = False
    output_logits: bool = False
    output_scores: bool = False

    @classmethod
    def merge(
        cls, *sources: dict | None, names: tuple[str, ...] | None = None, none_turns_off: tuple[str, ...] = ()
    ) -> GenerationSettings:
        """Later sources override earlier ones; a None value leaves the option as it was, except in the sources
        named in ``none_turns_off`` (keywords: transformers sets them on its GenerationConfig as given, so
        ``top_k=None`` turns top-k off whatever generation_config.json says). ``names`` label the sources in
        errors. An option of ``NOT_IMPLEMENTED`` whose value acts raises NotImplementedError naming it, its
        value and its source; other keys outside this class are ignored, as transformers keeps them on the
        GenerationConfig without using them (``generate`` refuses unknown keywords itself)."""
        names = names or tuple(f"source {i}" for i in range(len(sources)))
        merged: dict = {}
        origin: dict = {}
        for name, s in zip(names, sources):
            for k, v in (s or {}).items():
                if v is not None:
                    merged[k], origin[k] = v, name
                elif name in none_turns_off:
                    # Off is this class's default for every option but top_k, where None is off.
                    merged.pop(k, None)
                    if k == "top_k":
                        merged[k], origin[k] = None, name
        for k, v in merged.items():
            if k in NOT_IMPLEMENTED:
                acts, what, off = NOT_IMPLEMENTED[k]
                try:
                    active = acts(v, merged)
                except TypeError:
                    raise ValueError(
                        f"generate: {k}={_short(v)} (from {origin[k]}) is not a valid value"
                    ) from None
                if active:
                    raise NotImplementedError(
                        f"generate: {k}={_short(v)} (from {origin[k]}) asks for {what}, which is not "
                        f"implemented here; set {k}={off} or remove it"
                    )
        known = {f.name for f in fields(cls)}
        kept = {k: v for k, v in merged.items() if k in known}
        eos = kept.get("eos_token_id", [])
        kept["eos_token_id"] = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
        s = cls(**kept)
        s.validate()
        return s

    def validate(self):
        for name in (
            "max_new_tokens",
            "max_length",
            "top_k",
            "min_length",
            "min_new_tokens",
            "no_repeat_ngram_size",
        ):
            v = getattr(self, name)
            if v is not None and (
                not isinstance(v, (int, np.integer)) or v < (1 if name == "max_length" else 0)
            ):
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not 0 < self.typical_p <= 1:
            raise ValueError(f"typical_p must be in (0, 1], got {self.typical_p!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        for name in ("suppress_tokens", "begin_suppress_tokens"):
            v = getattr(self, name)
            if v is not None and not all(isinstance(t, (int, np.integer)) for t in v):
                raise ValueError(f"{name} must be a list of token ids, got {v!r}")
        bad = self.bad_words_ids
        if bad is not None and (
            not isinstance(bad, (list, tuple))
            or not bad
            or not all(
                isinstance(w, (list, tuple))
                and w
                and all(isinstance(t, (int, np.integer)) and t >= 0 for t in w)
                for w in bad
            )
        ):
            raise ValueError(
                f"bad_words_ids must be a non-empty list of non-empty lists of token ids, got {bad!r}"
            )

    def new_tokens(self, prompt_len: int) -> int:
        if self.max_new_tokens is not None:
            return int(self.max_new_tokens)
        return max(0, (self.max_length or 20) - prompt_len)

    def logits_returned(self) -> bool:
        """Whether ``generate`` returns the logits or scores of its steps."""
        return self.return_dict_in_generate and (self.output_logits or self.output_scores)

    def plain_argmax(self, length: int, prompt_len: int) -> bool:
        """Whether choosing the token after ``length`` tokens (prompt width ``prompt_len``
        included) is the argmax of the logits as they are: greedy, and no processor acts."""
        return (
            not self.do_sample
            and self.repetition_penalty == 1.0
            and self.no_repeat_ngram_size == 0
            and self.bad_words_ids is None
            and length >= self.min_total_length(prompt_len)
            and not self.remove_invalid_values
            and self.suppress_tokens is None
            and (self.begin_suppress_tokens is None or length != prompt_len)
            and not self.renormalize_logits
        )

    def min_total_length(self, prompt_len: int) -> int:
        """The length (prompt with its padding + new tokens) below which eos is suppressed."""
        if self.min_new_tokens is not None:
            return prompt_len + int(self.min_new_tokens)
        return int(self.min_length)


def _short(value) -> str:
    """repr of an option's value for an error message: whole when short, else its type."""
    r = repr(value)
    return r if len(r) <= 80 else f"<{type(value).__name__}>"


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


# ---------------------------------------------------------------- logits processors (as transformers)
#
# Each takes ``ids`` (B, L) int: every token so far, left padding included (transformers' ``input_ids``), and
# ``scores`` (B, V) float32, and returns new scores; a banned token gets -inf.


def repetition_penalty(ids: np.ndarray, scores: np.ndarray, penalty: float, ignore=None) -> np.ndarray:
    """Divide the positive (multiply the negative) score of every token present in ``ids`` by ``penalty``,
    once per token. ``ignore`` (B,) leading positions per row are skipped (transformers skips a left-padded
    row's padding). Ids at or past the vocabulary (image tokens) cannot be generated and are skipped."""
    vocab = scores.shape[-1]
    ids = np.minimum(ids, vocab)  # an extra column absorbs ids past the vocabulary
    if ignore is not None:
        ids = np.where(np.arange(ids.shape[1])[None, :] < np.asarray(ignore)[:, None], vocab, ids)
    seen = np.zeros((scores.shape[0], vocab + 1), bool)
    np.put_along_axis(seen, ids, True, axis=1)
    p = np.float32(penalty)
    return np.where(seen[:, :vocab], np.where(scores < 0, scores * p, scores / p), scores)


def no_repeat_ngram(ids: np.ndarray, scores: np.ndarray, n: int) -> np.ndarray:
    """Ban every token that would repeat an n-gram of ``ids``: each earlier window of n tokens whose first
    n - 1 match the last n - 1 tokens bans its last token."""
    length = ids.shape[1]
    if length < n:
        return scores
    windows = np.lib.stride_tricks.sliding_window_view(ids, n, axis=1)  # (B, L - n + 1, n)
    prefix = ids[:, length + 1 - n :]  # (B, n - 1)
    matches = (windows[..., :-1] == prefix[:, None, :]).all(axis=-1)
    out = scores.copy()
    rows, cols = np.nonzero(matches)
    tokens = windows[rows, cols, -1]
    keep = tokens < scores.shape[-1]
    out[rows[keep], tokens[keep]] = -np.inf
    return out


def bad_words(ids: np.ndarray, scores: np.ndarray, bad_words_ids, eos=()) -> np.ndarray:
    """Ban the last token of each sequence in ``bad_words_ids`` whose other tokens end ``ids`` (a
    one-token sequence always); a one-token sequence equal to an eos id is dropped, as transformers does."""
    vocab = scores.shape[-1]
    words = {tuple(int(t) for t in w) for w in bad_words_ids if list(w) not in [[int(e)] for e in eos]}
    past = sorted({t for w in words for t in w if t >= vocab})
    if past:
        raise ValueError(f"bad_words_ids: token ids {past} are outside the vocabulary of {vocab}")
    out = scores.copy()
    for w in words:
        prefix = np.array(w[:-1], np.int64)
        if len(prefix) > ids.shape[1]:
            continue
        rows = (ids[:, ids.shape[1] - len(prefix) :] == prefix).all(axis=1) if len(prefix) else slice(None)
        out[rows, w[-1]] = -np.inf
    return out


def suppress(scores: np.ndarray, tokens) -> np.ndarray:
    """Ban ``tokens`` (ids past the vocabulary are ignored)."""
    tokens = np.asarray(list(tokens), np.int64)
    tokens = tokens[(tokens >= 0) & (tokens < scores.shape[-1])]
    out = scores.copy()
    out[:, tokens] = -np.inf
    return out


def remove_invalid(scores: np.ndarray) -> np.ndarray:
    """NaN -> 0, +-inf -> the largest finite value of the dtype with its sign."""
    info = np.finfo(scores.dtype)
    out = np.where(np.isnan(scores), scores.dtype.type(0), scores)
    return np.where(np.isposinf(scores), info.max, np.where(np.isneginf(scores), info.min, out))


def process(
    ids: np.ndarray, scores: np.ndarray, s: GenerationSettings, prompt_len: int, ignore=None
) -> np.ndarray:
    """transformers' logits processors, in its order: repetition penalty, n-gram blocking, bad words, minimum
    length, invalid-value removal, suppressed tokens, tokens suppressed at the first step. ``prompt_len`` is
    the prompt's width (with padding); ``ignore`` (B,) the padding of each row (for the repetition penalty)."""
    x = np.asarray(scores, np.float32)  # each processor that acts returns a new array
    if s.repetition_penalty != 1.0:
        x = repetition_penalty(ids, x, s.repetition_penalty, ignore)
    if s.no_repeat_ngram_size > 0:
        x = no_repeat_ngram(ids, x, s.no_repeat_ngram_size)
    if s.bad_words_ids is not None:
        x = bad_words(ids, x, s.bad_words_ids, s.eos_token_id)
    if ids.shape[1] < s.min_total_length(prompt_len):
        x = suppress(x, s.eos_token_id)
    if s.remove_invalid_values:
        x = remove_invalid(x)
    if s.suppress_tokens is not None:
        x = suppress(x, s.suppress_tokens)
    if s.begin_suppress_tokens is not None and ids.shape[1] == prompt_len:
        x = suppress(x, s.begin_suppress_tokens)
    return x


# ---------------------------------------------------------------- logits warpers (as transformers)


def padding_mask(ids: np.ndarray, pad_token_id: int | None, eos_token_id: list[int]) -> np.ndarray:
    """The attention mask ``generate`` assumes when none is given, as transformers infers it: 0 where
    ``ids`` hold the pad token, if the pad token occurs and is not also an end-of-sequence token;
    otherwise all ones. (batch, seq) int64."""
    if pad_token_id is None or pad_token_id in eos_token_id or not (ids == pad_token_id).any():
        return np.ones_like(ids)
    return (ids != pad_token_id).astype(np.int64)


def warp(logits: np.ndarray, s: GenerationSettings) -> np.ndarray:
    """Temperature, then top-k, top-p, min-p and typical-p, on (B, V) float logits; removed entries -> -inf.
    These act only when sampling, as in transformers."""
    x = logits.astype(np.float32, copy=True)
    if s.temperature != 1.0:
        x /= np.float32(s.temperature)
    if s.top_k is not None and 0 < s.top_k < x.shape[-1]:
        kth = np.partition(x, -s.top_k, axis=-1)[:, -s.top_k][:, None]
        x[x < kth] = -np.inf
    if s.top_p < 1.0:
        for row in x:
            # Only the tokens still in play are sorted (top-k leaves 64 of 262 144): removed ones
            # have probability 0 and would sit first in the ascending order, adding nothing.
            live = np.flatnonzero(row > -np.inf)
            order = live[np.argsort(row[live], kind="stable")]  # ascending, as transformers sorts
            cum = np.cumsum(_softmax(row[order]))
            remove = cum <= (1 - s.top_p)
            remove[-1] = False  # keep at least one token
            row[order[remove]] = -np.inf
    if s.min_p is not None:
        # Applied after temperature, as transformers (and llama.cpp) do: the threshold scales with the top token.
        probs = _softmax(x)
        x[probs < np.float32(s.min_p) * probs.max(axis=-1, keepdims=True)] = -np.inf
    if s.typical_p < 1.0:
        x = _typical(x, s.typical_p)
    return x


def _typical(x: np.ndarray, mass: float) -> np.ndarray:
    """Keep the tokens whose surprisal is closest to the entropy, up to probability ``mass`` (the first
    token past it included), as transformers' TypicalLogitsWarper."""
    with np.errstate(invalid="ignore", divide="ignore"):
        logp = x - np.max(x, axis=-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(axis=-1, keepdims=True))
        p = np.exp(logp)
        ent = -np.nansum(logp * p, axis=-1, keepdims=True)  # -inf * 0 = nan for removed tokens: skipped
        shifted = np.abs(-logp - ent)
    order = np.argsort(shifted, axis=-1, kind="stable")
    sorted_shift = np.take_along_axis(shifted, order, axis=-1)
    cum = np.cumsum(_softmax(np.take_along_axis(x, order, axis=-1)), axis=-1)
    last = np.minimum((cum < mass).sum(axis=-1), x.shape[-1] - 1)
    remove = sorted_shift > np.take_along_axis(sorted_shift, last[:, None], axis=-1)
    remove[:, 0] = False  # keep at least one token
    out = x.copy()
    rows = np.arange(x.shape[0])[:, None]
    out[rows, order] = np.where(remove, -np.inf, np.take_along_axis(x, order, axis=-1))
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        shifted = x - np.max(x, axis=-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


# ---------------------------------------------------------------- choosing the next token


def numpy_sampler(seed: int | None):
    """Draw one token per row from softmax(scores) with ``np.random.default_rng(seed)`` (inverse CDF in fp64)."""
    rng = np.random.default_rng(seed)

    def sample(scores: np.ndarray) -> np.ndarray:
        probs = _softmax(scores.astype(np.float64))
        u = rng.random((probs.shape[0], 1))
        return np.minimum((np.cumsum(probs, axis=-1) < u).sum(axis=-1), probs.shape[-1] - 1)

    return sample


def torch_sampler():
    """Draw one token per row as transformers does: ``torch.multinomial`` on the fp32 softmax, from torch's
    global generator (so ``torch.manual_seed`` makes a run repeatable)."""
    import torch

    def sample(scores: np.ndarray) -> np.ndarray:
        probs = torch.softmax(torch.from_numpy(np.ascontiguousarray(scores, np.float32)), dim=-1)
        return torch.multinomial(probs, num_samples=1)[:, 0].numpy()

    return sample


def choose(
    ids: np.ndarray, logits: np.ndarray, s: GenerationSettings, sample, prompt_len: int, ignore=None
) -> tuple[np.ndarray, np.ndarray]:
    """Next tokens (B,) and the processed scores (B, V) after ``ids`` (B, L): processors, then (sampling)
    warpers and a draw with ``sample(scores) -> tokens``, else the argmax."""
    scores = process(ids, logits, s, prompt_len, ignore)
    if s.do_sample:
        scores = warp(scores, s)
    if s.renormalize_logits:
        scores = log_softmax(scores)  # transformers' LogitNormalization: always the last processor
    if not s.do_sample:
        return np.argmax(scores, axis=-1), scores
    return sample(scores), scores


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
    prefill,
    decode,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    s: GenerationSettings,
    streamer=None,
    sample=None,
    decode_top=None,
):
    """Run prefill once and decode until every sequence ended or the budget is spent. ``sample(scores (B, V))
    -> tokens (B,)`` draws when sampling (default: ``numpy_sampler(s.seed)``). ``decode_top(tokens, steps) ->
    next tokens (B,)`` (optional; ``steps``: the decode steps left, this one included), a decode step giving
    only its logits' argmax, runs instead of ``decode`` where
    the next choice is exactly that (``s.plain_argmax``); the caller passes it only when no logits are returned.

    Returns (sequences (B, T + n) int64, raw logits per step, processed scores per step; None for the steps
    ``decode_top`` ran)."""
    batch, prompt_len = input_ids.shape
    n_new = s.new_tokens(prompt_len)
    sample = sample if sample is not None else numpy_sampler(s.seed)
    pad = s.pad_token_id if s.pad_token_id is not None else (s.eos_token_id[0] if s.eos_token_id else 0)
    eos = np.array(s.eos_token_id, np.int64)
    # The padding of each left-padded row, which the repetition penalty skips (transformers' prompt_ignore_length).
    ignore = None if attention_mask is None else np.argmax(np.asarray(attention_mask) != 0, axis=1)
    sequences = np.zeros((batch, prompt_len + n_new), np.int64)
    sequences[:, :prompt_len] = input_ids
    length = prompt_len
    raw_logits, scores = [], []
    done = np.zeros(batch, bool)
    if streamer is not None:
        streamer.put(input_ids.astype(np.int64))
    logits = prefill(input_ids, attention_mask) if n_new > 0 else None
    top = None  # the next tokens, when decode_top gave them
    for step in range(n_new):
        if top is None:
            tokens, processed = choose(sequences[:, :length], logits, s, sample, prompt_len, ignore)
        else:
            tokens, processed = top, None
        tokens = np.where(done, pad, tokens).astype(np.int64)
        raw_logits.append(logits)
        scores.append(processed)
        sequences[:, length] = tokens
        length += 1
        if streamer is not None:
            streamer.put(tokens)
        done |= np.isin(tokens, eos)
        if done.all() or step == n_new - 1:
            break
        if decode_top is not None and s.plain_argmax(length, prompt_len):
            logits, top = None, np.asarray(decode_top(tokens, n_new - 1 - step), np.int64)
        else:
            logits, top = decode(tokens), None
    if streamer is not None:
        streamer.end()
    return sequences[:, :length], tuple(raw_logits), tuple(scores)
