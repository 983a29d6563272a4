"""Plan-only cost of a decoder on one chip preset: no weights, no values, any model size.

    from gemma3.estimate import estimate
    e = estimate("Qwen3-1.7B/config.json", npu="rbln-ca25", prompt_tokens=1024, new_tokens=64)
    print(e.table())          # e.prefill_ms, e.decode_step_ms, e.to_dict()

    python -m gemma3 estimate --config CONFIG.json --npu PRESET [--batch B] [--prompt-tokens P]
        [--new-tokens N] [--chunk C] [--max-seq-len L] [--weights-dtype bf16|fp32] [--tp 1] [--json]

The kernels are the ones ``Gemma3OnNPU`` runs (gemma3/model.py), at the signatures and
constants it passes them, planned with ``NPU.plan`` as compiling does (a test holds the two
equal on a compiled tiny model):

* prefill: one sequence at a time, in chunks of ``chunk`` tokens, the last one padded to the
  whole chunk (shapes are static, as on the chip); per layer: input RMSNorm, fused QKV matmul,
  q_norm and k_norm, RoPE of q and k, the attention of the chunk against the cache, the chunk's
  valid keys and values into the cache, the output projection, the post-attention and
  pre-feedforward RMSNorms, the gated MLP, the post-feedforward RMSNorm; then the final RMSNorm
  and the LM head on the last valid token;
* decode: the whole batch (the compiled batch is the bucket it pads to) one token per step,
  the attention over the cache up to the step's position in whole KV tiles.

A Gemma3 ``config.json`` (text, or image+text: its text stack) is costed as it runs. A Qwen3 or
Llama-style ``config.json`` is costed as the same kernels: every layer global, the SwiGLU MLP
as the GeGLU kernel (the same three matrices; its GELU costs the SFU what SiLU would), no
embedding scale, attention scale head_dim ** -0.5; Gemma's extra norms (the post-norms, and
q_norm / k_norm where a Llama has none) stay, a few vector passes per layer. ``weights_dtype`` is the device dtype: fp32 stores and
streams the weights (and the activations, the caches) in 4 bytes.

Each prefill chunk and each decode step is one call from the host: the preset's
``host_step_us`` is added per call, beside the device's cycles.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field

from npu_emulator import NPU, get_preset
from npu_kernels.attention_decode import attention_decode, decode_kv_tile
from npu_kernels.attention_prefill import attention_prefill
from npu_kernels.embedding import embedding
from npu_kernels.kvcache import kv_cache_write
from npu_kernels.lm_head import lm_head
from npu_kernels.matmul import matmul
from npu_kernels.mlp import geglu_mlp
from npu_kernels.norms import rmsnorm
from npu_kernels.rope import rope

from .config import FULL, SHAPE_FIELDS, SLIDING, Gemma3TextConfig, RopeParams, read_json, require_fields

# model_type of config.json files costed as Gemma3's kernels with every layer global.
LLAMA_STYLE = ("llama", "qwen3", "qwen2", "mistral")
WEIGHTS_DTYPES = ("bf16", "fp32")
# Kernel roles, in the order the breakdown lists them; "linear" sums the projections and the MLP.
ROLES = ("embedding", "norms", "qkv_proj", "rope", "attention", "kv_cache_write", "o_proj", "mlp", "lm_head")
LINEAR = ("qkv_proj", "o_proj", "mlp")


def read_config(path) -> tuple[Gemma3TextConfig, float, str]:
    """``config.json`` -> (text config, embedding scale, family): Gemma3 (either style, text or
    image+text) as it is; Qwen3 / Llama-style mapped onto the same fields, all layers global."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such config file")
    d, source = read_json(path)
    if not isinstance(d, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
    model_type = d.get("model_type")
    if model_type in ("gemma3", "gemma3_text") or "text_config" in d:
        c = Gemma3TextConfig.from_dict(d, source)
        return c, c.embed_scale, "gemma3"
    if model_type not in LLAMA_STYLE:
        raise ValueError(
            f"{source}: model_type {model_type!r} is not one the estimate costs "
            f"(gemma3, gemma3_text, {', '.join(LLAMA_STYLE)})"
        )
    require_fields(d, SHAPE_FIELDS, source)
    for k in SHAPE_FIELDS:
        if not isinstance(d[k], int) or isinstance(d[k], bool) or d[k] < 1:
            raise ValueError(f"{source}: {k} must be a positive integer, got {d[k]!r}")
    heads = d["num_attention_heads"]
    kv_heads = int(d.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise ValueError(
            f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )
    head_dim = int(d.get("head_dim") or d["hidden_size"] // heads)
    n_layers = d["num_hidden_layers"]
    max_pos = int(d.get("max_position_embeddings", 131072))
    # RoPE tables are costed by shape only: the scaling kind does not change a cycle.
    rope_params = RopeParams(theta=float(d.get("rope_theta", 10_000.0)))
    c = Gemma3TextConfig(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        sliding_window=max_pos,
        layer_types=(FULL,) * n_layers,
        rope={FULL: rope_params, SLIDING: rope_params},
        query_pre_attn_scalar=float(head_dim),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        raw=dict(d),
    )
    return c, 1.0, model_type


@dataclass
class RoleCost:
    """The kernels of one role in one phase: calls and their summed device cycles."""

    calls: int = 0
    cycles: int = 0
    flops: int = 0
    dram_bytes: int = 0


@dataclass
class PhaseEstimate:
    cycles: int = 0  # device cycles of the phase
    calls: int = 0  # host calls (prefill chunks, or decode steps)
    roles: dict[str, RoleCost] = field(default_factory=dict)

    def add(self, role: str, report, times: int = 1) -> None:
        r = self.roles.setdefault(role, RoleCost())
        r.calls += times
        r.cycles += times * report.cycles
        r.flops += times * report.flops
        r.dram_bytes += times * report.dram_bytes
        self.cycles += times * report.cycles


@dataclass
class Estimate:
    """What ``estimate`` returns: times in milliseconds (device at the preset's clock, plus the
    preset's host time per call), tokens/s, and the device cycles per phase and kernel role."""

    model: str
    npu: str
    clock_hz: float
    host_step_us: float
    batch: int
    prompt_tokens: int
    new_tokens: int
    chunk: int
    max_seq_len: int
    weights_dtype: str
    tp: int
    prefill: PhaseEstimate  # every sequence's prompt, all chunks (sequences one after another)
    decode: PhaseEstimate  # the new_tokens - 1 decode steps of the whole batch
    decode_step: PhaseEstimate  # one decode step at the last position (the slowest)

    def _ms(self, phase: PhaseEstimate) -> float:
        return phase.cycles / self.clock_hz * 1e3 + phase.calls * self.host_step_us / 1e3

    @property
    def prefill_ms(self) -> float:
        """The batch's prefill: every sequence, every chunk, the last one padded to the whole chunk."""
        return self._ms(self.prefill)

    @property
    def decode_ms(self) -> float:
        """All decode steps (new_tokens - 1: the prefill's logits give the first new token)."""
        return self._ms(self.decode)

    @property
    def decode_step_ms(self) -> float:
        """One decode step of the whole batch at the last position."""
        return self._ms(self.decode_step)

    def role_ms(self, phase: str, roles) -> float:
        """Device milliseconds of some kernel roles in ``prefill``, ``decode`` or ``decode_step``."""
        p = getattr(self, phase)
        roles = (roles,) if isinstance(roles, str) else roles
        return sum(p.roles[r].cycles for r in roles if r in p.roles) / self.clock_hz * 1e3

    def to_dict(self) -> dict:
        phases = {}
        for name in ("prefill", "decode", "decode_step"):
            p = getattr(self, name)
            phases[name] = {
                "cycles": p.cycles,
                "host_calls": p.calls,
                "ms": self._ms(p),
                "kernels": {
                    role: {
                        "calls": r.calls,
                        "cycles": r.cycles,
                        "ms": r.cycles / self.clock_hz * 1e3,
                        "flops": r.flops,
                        "dram_bytes": r.dram_bytes,
                    }
                    for role, r in p.roles.items()
                },
            }
        decode_s = self.decode_step_ms / 1e3
        return {
            "model": self.model,
            "npu": self.npu,
            "batch": self.batch,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "chunk": self.chunk,
            "prefill_chunks": self.prefill.calls // self.batch,
            "max_seq_len": self.max_seq_len,
            "weights_dtype": self.weights_dtype,
            "tp": self.tp,
            "host_step_us": self.host_step_us,
            "prefill_ms": self.prefill_ms,
            "prefill_tok_s": self.batch * self.prompt_tokens / (self.prefill_ms / 1e3),
            "decode_step_ms": self.decode_step_ms,
            "decode_tok_s": self.batch / decode_s,
            "decode_ms": self.decode_ms,
            "phases": phases,
        }

    def table(self) -> str:
        d = self.to_dict()
        lines = [
            f"{self.model} on {self.npu} ({self.weights_dtype} weights), batch {self.batch}, "
            f"prompt {self.prompt_tokens} tokens in {self.prefill.calls // self.batch} chunk(s) of {self.chunk}, "
            f"{self.new_tokens} new tokens, max_seq_len {self.max_seq_len}",
            f"prefill (batch {self.batch:<3})     {d['prefill_ms']:12.3f} ms  {d['prefill_tok_s']:12,.1f} tok/s",
            f"decode step (batch {self.batch:<3}) {d['decode_step_ms']:12.3f} ms  {d['decode_tok_s']:12,.1f} tok/s"
            f"  (at position {self.prompt_tokens + max(self.new_tokens - 2, 0)})",
            f"host per call           {self.host_step_us / 1e3:12.3f} ms  (prefill chunk or decode step)",
            "",
            f"{'kernel role':<16}{'prefill calls':>14}{'prefill ms':>12}{'%':>7}{'step calls':>12}{'step ms':>10}{'%':>7}",
        ]
        pre, step = self.prefill, self.decode_step
        for role in ROLES:
            p, s = pre.roles.get(role, RoleCost()), step.roles.get(role, RoleCost())
            if not (p.calls or s.calls):
                continue
            pm, sm = p.cycles / self.clock_hz * 1e3, s.cycles / self.clock_hz * 1e3
            lines.append(
                f"{role:<16}{p.calls:>14,}{pm:>12.3f}{100 * p.cycles / max(pre.cycles, 1):>7.1f}"
                f"{s.calls:>12,}{sm:>10.3f}{100 * s.cycles / max(step.cycles, 1):>7.1f}"
            )
        return "\n".join(lines)


def _positive(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def estimate(
    config,
    npu="atom",
    *,
    batch: int = 1,
    prompt_tokens: int = 128,
    new_tokens: int = 128,
    chunk: int = 128,
    weights_dtype: str = "bf16",
    max_seq_len: int | None = None,
    tp: int = 1,
) -> Estimate:
    """Plan-only cost of ``config`` (a config.json path, or a ``Gemma3TextConfig``) on ``npu``
    (a preset name or an ``NPUConfig``): ``batch`` sequences of ``prompt_tokens`` each, then
    ``new_tokens`` new tokens each. ``max_seq_len`` (the compiled cache length) defaults to
    prompt + new tokens. ``tp`` (tensor parallel devices) is a parameter for when several
    devices are emulated; only 1 is supported now."""
    if isinstance(config, Gemma3TextConfig):
        c, scale, family = config, config.embed_scale, "gemma3"
        model = "gemma3"
    else:
        c, scale, family = read_config(config)
        model = os.path.basename(os.path.dirname(os.path.abspath(os.fspath(config)))) or family
    for name, value in (("batch", batch), ("prompt_tokens", prompt_tokens), ("new_tokens", new_tokens)):
        _positive(name, value)
    _positive("chunk", chunk)
    if chunk % 64:
        raise ValueError(f"chunk must be divisible by 64 (as prefill_chunk_size), got {chunk}")
    if weights_dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"weights_dtype must be one of {WEIGHTS_DTYPES}, got {weights_dtype!r}")
    _positive("tp", tp)
    if tp != 1:
        raise NotImplementedError(
            f"tp {tp}: tensor parallelism over several devices is not emulated yet; only tp 1"
        )
    seq = prompt_tokens + new_tokens
    max_seq_len = seq if max_seq_len is None else _positive("max_seq_len", max_seq_len)
    if seq > max_seq_len:
        raise ValueError(
            f"prompt_tokens + new_tokens = {seq} exceeds max_seq_len {max_seq_len} (the compiled cache)"
        )
    cfg = get_preset(npu)
    plan = _Planner(_device(cfg, weights_dtype), c, scale, batch, max_seq_len)

    prefill = PhaseEstimate()
    for start in range(0, prompt_tokens, chunk):
        plan.prefill_chunk(prefill, start, min(chunk, prompt_tokens - start), chunk, prompt_tokens)
    decode = PhaseEstimate()
    for pos in range(prompt_tokens, prompt_tokens + new_tokens - 1):
        plan.decode_step(decode, pos)
    step = PhaseEstimate()
    plan.decode_step(step, prompt_tokens + max(new_tokens - 2, 0))
    return Estimate(
        model=model,
        npu=cfg.name,
        clock_hz=cfg.clock_hz,
        host_step_us=cfg.host_step_us,
        batch=batch,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        chunk=chunk,
        max_seq_len=max_seq_len,
        weights_dtype=weights_dtype,
        tp=tp,
        prefill=prefill,
        decode=decode,
        decode_step=step,
    )


@functools.lru_cache(maxsize=2)
def _device(cfg, dtype: str) -> NPU:
    """One NPU per chip and dtype: its plans serve every estimate made on it in this process."""
    return NPU(cfg, dtype=dtype)


class _Planner:
    """The kernel calls of ``Gemma3OnNPU.prefill`` / ``decode`` as (signature, consts), planned."""

    def __init__(self, npu: NPU, c: Gemma3TextConfig, embed_scale: float, batch: int, max_seq_len: int):
        self.npu, self.c, self.scale, self.batch = npu, c, embed_scale, batch
        self.dt = npu.dtype
        self.kv_tile = decode_kv_tile(npu.config)
        self.max_seq_len = max_seq_len
        if c.sliding_window < max_seq_len and c.sliding_window % self.kv_tile:
            raise NotImplementedError(
                f"sliding_window {c.sliding_window} is not a multiple of the decode KV tile "
                f"{self.kv_tile} of {npu.config.name!r}: the ring buffer must hold whole tiles"
            )
        global_slots = math.ceil(max_seq_len / self.kv_tile) * self.kv_tile
        self.slots = [c.sliding_window if self.ring(i) else global_slots for i in range(c.num_hidden_layers)]

    def ring(self, i: int) -> bool:
        return self.c.is_sliding(i) and self.c.sliding_window < self.max_seq_len

    def f(self, *shape):
        return (tuple(shape), self.dt)

    @staticmethod
    def i32(*shape):
        return (tuple(shape), "int32")

    def add(self, phase: PhaseEstimate, role: str, kernel, signature, consts=None, times: int = 1):
        try:
            report = self.npu.plan(kernel, signature, consts or {}).report
        except Exception as e:
            shapes = ", ".join(f"{tuple(s)} {d}" for s, d in signature)
            raise type(e)(f"kernel {kernel.name} at ({shapes}) with {consts}: {e}") from None
        phase.add(role, report, times)

    def layer(self, phase, i, t, attend, times):
        """One decoder layer on t rows, as ``Gemma3OnNPU._layer``; ``attend`` adds the attention."""
        c, f, eps = self.c, self.f, self.c.rms_norm_eps
        d, hq, hkv, hd = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        norm = {"eps": eps}
        cos = f(c.max_position_embeddings, hd)
        self.add(phase, "norms", rmsnorm, [f(t, d), f(d)], norm, times)
        self.add(phase, "qkv_proj", matmul, [f(t, d), f(d, (hq + 2 * hkv) * hd)], None, times)
        self.add(phase, "norms", rmsnorm, [f(t, hq, hd), f(hd)], norm, times)
        self.add(phase, "norms", rmsnorm, [f(t, hkv, hd), f(hd)], norm, times)
        self.add(phase, "rope", rope, [f(t, hq, hd), cos, cos, self.i32(t)], None, times)
        self.add(phase, "rope", rope, [f(t, hkv, hd), cos, cos, self.i32(t)], None, times)
        attend(i)
        self.add(phase, "o_proj", matmul, [f(t, hq * hd), f(hq * hd, d)], None, times)
        for _ in range(2):  # post-attention, pre-feedforward
            self.add(phase, "norms", rmsnorm, [f(t, d), f(d)], norm, times)
        f_ = c.intermediate_size
        self.add(phase, "mlp", geglu_mlp, [f(t, d), f(d, f_), f(d, f_), f(f_, d)], None, times)
        self.add(phase, "norms", rmsnorm, [f(t, d), f(d)], norm, times)

    def logits(self, phase, rows, times):
        c, f = self.c, self.f
        self.add(
            phase,
            "norms",
            rmsnorm,
            [f(rows, c.hidden_size), f(c.hidden_size)],
            {"eps": c.rms_norm_eps},
            times,
        )
        sig = [f(rows, c.hidden_size), f(c.hidden_size, c.vocab_size), self.i32(c.vocab_size)]
        self.add(phase, "lm_head", lm_head, sig, {"softcap": c.final_logit_softcapping}, times)

    def cache(self, i):
        c = self.c
        return self.f(self.batch, c.num_key_value_heads, self.slots[i], c.head_dim)

    def prefill_chunk(self, phase, start, valid, size, n):
        """One prefill chunk of every sequence of the batch (they cost the same: sequence b's
        chunk differs from sequence 0's only in the cache rows it addresses)."""
        c, f, b = self.c, self.f, self.batch
        hq, hkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        phase.calls += b
        self.add(
            phase,
            "embedding",
            embedding,
            [self.i32(size), f(c.vocab_size, c.hidden_size)],
            {"scale": self.scale},
            b,
        )

        def attend(i):
            consts = dict(
                q_start=start,
                scale=c.attention_scale,
                window=c.sliding_window if c.is_sliding(i) else None,
                ring=self.ring(i),
                batch=0,
            )
            cache = self.cache(i)
            sig = [f(size, hq, hd), f(size, hkv, hd), f(size, hkv, hd), cache, cache]
            self.add(phase, "attention", attention_prefill, sig, consts, b)
            for _ in range(2):  # keys, values
                sig = [cache, f(1, valid, hkv, hd), self.i32(1, valid, hkv)]
                self.add(phase, "kv_cache_write", kv_cache_write, sig, None, b)

        for i in range(c.num_hidden_layers):
            self.layer(phase, i, size, attend, b)
        if start + valid == n:
            self.logits(phase, 1, b)

    def decode_step(self, phase, pos):
        """One decode step of the whole batch, every sequence at position ``pos``."""
        c, f, b = self.c, self.f, self.batch
        hq, hd = c.num_attention_heads, c.head_dim
        phase.calls += 1
        self.add(
            phase,
            "embedding",
            embedding,
            [self.i32(b), f(c.vocab_size, c.hidden_size)],
            {"scale": self.scale},
        )

        def attend(i):
            cache, hkv = self.cache(i), c.num_key_value_heads
            for _ in range(2):
                self.add(
                    phase, "kv_cache_write", kv_cache_write, [cache, f(b, 1, hkv, hd), self.i32(b, 1, hkv)]
                )
            slots = self.slots[i]
            reach = min(pos + 1, slots)
            length = min(slots, math.ceil(reach / self.kv_tile) * self.kv_tile)
            # The mask goes up as a float array: the device dtype (as NPU.run uploads it).
            sig = [f(b, hq, hd), cache, cache, f(b, length)]
            self.add(phase, "attention", attention_decode, sig, {"scale": c.attention_scale})

        for i in range(c.num_hidden_layers):
            self.layer(phase, i, b, attend, 1)
        self.logits(phase, b, 1)
