"""Plan-only cost of a decoder on one chip preset: no weights, no values, any model size.

    from gemma3.estimate import estimate
    e = estimate("Qwen3-1.7B/config.json", npu="rbln-ca25", prompt_tokens=1024, new_tokens=64)
    print(e.table())          # e.prefill_ms, e.decode_step_ms, e.to_dict()

    python -m gemma3 estimate --config CONFIG.json --npu PRESET [--batch B] [--prompt-tokens P]
        [--new-tokens N] [--chunk C] [--max-seq-len L] [--weights-dtype bf16|fp32] [--tp N] [--json]

The kernels are the ones ``Gemma3OnNPU`` runs (gemma3/runtime.py), at the signatures and
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

Tensor parallelism (``tp`` devices of the preset, joined by its link, ``npu_emulator.group``),
Megatron-style as vLLM and optimum-rbln shard a decoder, split as the runtime splits it
(``gemma3.tensor_parallel.plan_shards``, costed on the device with the most heads): the
attention heads over the devices, the kv heads too where there are at least as many as devices
and else replicated (each device holds the ones its query heads read); q/k/v and
gate/up column-split; o_proj and down_proj row-split, each followed by an all-reduce of the
(tokens, hidden) activations; the vocabulary split for the embedding (each device gathers the
rows it holds, zeros elsewhere, then an all-reduce) and for the LM head (logits and argmax of
its slice, then an all-gather of each device's (max, id) per row); norms and RoPE replicated.
Every device runs the same shapes, so a step's time is one device's kernels plus the
collectives, each planned over the whole group (the faster of the ring and the tree, as NCCL
picks by size). The phases split their cycles into compute (kernels bound by a compute unit),
memory (bound by DRAM or a DMA queue) and communication (collectives).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field

from npu_emulator import NPU, DeviceGroup, get_preset
from npu_kernels.attention_decode import attention_decode, decode_kv_tile
from npu_kernels.attention_prefill import attention_prefill
from npu_kernels.collectives import all_gather, all_reduce, fastest_algorithm
from npu_kernels.embedding import embedding
from npu_kernels.kvcache import kv_cache_write
from npu_kernels.lm_head import lm_head
from npu_kernels.lora import geglu_combine, lora
from npu_kernels.matmul import matmul
from npu_kernels.mlp import geglu_mlp
from npu_kernels.norms import rmsnorm
from npu_kernels.rope import rope

from .config import FULL, SHAPE_FIELDS, SLIDING, Gemma3TextConfig, RopeParams, read_json, require_fields
from .runtime import memory_bound
from .tensor_parallel import plan_shards

# model_type of config.json files costed as Gemma3's kernels with every layer global.
LLAMA_STYLE = ("llama", "qwen3", "qwen2", "mistral")
WEIGHTS_DTYPES = ("bf16", "fp32")
# Kernel roles, in the order the breakdown lists them; "linear" sums the projections and the MLP.
ROLES = (
    "embedding",
    "norms",
    "qkv_proj",
    "rope",
    "attention",
    "kv_cache_write",
    "o_proj",
    "mlp",
    "lora",
    "lm_head",
    "all_reduce",
    "all_gather",
)
# LoRA targets the estimate can cost (gemma3/lora.py): our short names of the decoder projections.
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
LINEAR = ("qkv_proj", "o_proj", "mlp")
COLLECTIVES = ("all_reduce", "all_gather")


# Binding units of a kernel whose time the memory system sets (else a compute unit does).
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
    # The cycles split by what bounds them: kernels whose binding unit is a compute unit, the
    # memory system (DRAM, a DMA queue), and the collectives over the links.
    compute_cycles: int = 0
    memory_cycles: int = 0
    comm_cycles: int = 0

    def add(self, role: str, report, times: int = 1) -> None:
        r = self.roles.setdefault(role, RoleCost())
        r.calls += times
        r.cycles += times * report.cycles
        r.flops += times * report.flops
        r.dram_bytes += times * report.dram_bytes
        self.cycles += times * report.cycles
        if memory_bound(report):
            self.memory_cycles += times * report.cycles
        else:
            self.compute_cycles += times * report.cycles

    def add_collective(self, role: str, report, times: int = 1) -> None:
        """A collective's ``GroupReport``: its cycles on the group's critical path."""
        r = self.roles.setdefault(role, RoleCost())
        r.calls += times
        r.cycles += times * report.cycles
        r.dram_bytes += times * report.devices[0].dram_bytes
        self.cycles += times * report.cycles
        self.comm_cycles += times * report.cycles

    def split(self) -> dict[str, float]:
        """Shares (0-1) of the phase's device cycles: compute, memory, communication."""
        total = max(self.cycles, 1)
        return {
            "compute": self.compute_cycles / total,
            "memory": self.memory_cycles / total,
            "communication": self.comm_cycles / total,
        }


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
    link: str | None  # the devices' link (tp > 1), None on one device
    weight_bytes_per_device: int  # the busiest device's shard of the weights
    dram_bytes_per_device: int  # each device's DRAM capacity
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
                "compute_cycles": p.compute_cycles,
                "memory_cycles": p.memory_cycles,
                "comm_cycles": p.comm_cycles,
                "share": p.split(),
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
            "link": self.link,
            "weight_bytes_per_device": self.weight_bytes_per_device,
            "weights_fit": self.weight_bytes_per_device <= self.dram_bytes_per_device,
            "host_step_us": self.host_step_us,
            "prefill_ms": self.prefill_ms,
            "prefill_tok_s": self.batch * self.prompt_tokens / (self.prefill_ms / 1e3),
            "decode_step_ms": self.decode_step_ms,
            "decode_tok_s": self.batch / decode_s,
            "decode_ms": self.decode_ms,
            "decode_step_comm_ms": self.decode_step.comm_cycles / self.clock_hz * 1e3,
            "prefill_comm_ms": self.prefill.comm_cycles / self.clock_hz * 1e3,
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
        ]
        if self.tp > 1:
            fit = "fits" if d["weights_fit"] else "does NOT fit"
            lines.append(
                f"tensor parallel         {self.tp} devices over {self.link}; weights per device "
                f"{self.weight_bytes_per_device / 2**30:.2f} GiB ({fit} {self.dram_bytes_per_device / 2**30:.0f} GiB)"
            )
        pre, step = self.prefill, self.decode_step
        for name, p in (("prefill", pre), ("decode step", step)):
            sh = p.split()
            lines.append(
                f"{name + ' split':<24}compute {100 * sh['compute']:5.1f}%  memory {100 * sh['memory']:5.1f}%  "
                f"communication {100 * sh['communication']:5.1f}%"
            )
        lines += [
            "",
            f"{'kernel role':<16}{'prefill calls':>14}{'prefill ms':>12}{'%':>7}{'step calls':>12}{'step ms':>10}{'%':>7}",
        ]
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
    lora_rank: int | None = None,
    lora_adapters: int = 1,
    lora_targets=LORA_TARGETS,
) -> Estimate:
    """Plan-only cost of ``config`` (a config.json path, or a ``Gemma3TextConfig``) on ``npu``
    (a preset name or an ``NPUConfig``): ``batch`` sequences of ``prompt_tokens`` each, then
    ``new_tokens`` new tokens each. ``max_seq_len`` (the compiled cache length) defaults to
    prompt + new tokens. ``tp``: tensor-parallel devices of ``npu`` over its preset's link
    (see the module docstring). ``lora_rank``: compile ``lora_adapters`` LoRA adapters (plus
    the reserved base one) padded to this rank on ``lora_targets``, as ``Gemma3OnNPU`` runs them
    (the lora kernel after each targeted projection; the MLP unfused when a target is in it);
    their kernels show as the role "lora"."""
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
    seq = prompt_tokens + new_tokens
    max_seq_len = seq if max_seq_len is None else _positive("max_seq_len", max_seq_len)
    if seq > max_seq_len:
        raise ValueError(
            f"prompt_tokens + new_tokens = {seq} exceeds max_seq_len {max_seq_len} (the compiled cache)"
        )
    cfg = get_preset(npu)
    group = _group(cfg, tp, weights_dtype) if tp > 1 else None
    plan = _Planner(_device(cfg, weights_dtype), c, scale, batch, max_seq_len, group)
    if lora_rank is not None:
        if tp > 1:
            raise NotImplementedError(f"lora_rank with tp {tp}: LoRA on sharded projections is not planned")
        plan.lora = (_positive("lora_rank", lora_rank), _positive("lora_adapters", lora_adapters) + 1)
        unknown = sorted(set(lora_targets) - set(LORA_TARGETS))
        if unknown:
            raise ValueError(f"lora_targets {unknown}: the projections are {list(LORA_TARGETS)}")
        plan.lora_targets = tuple(lora_targets)

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
        link=group.link.name if group else None,
        weight_bytes_per_device=plan.weight_bytes(),
        dram_bytes_per_device=cfg.dram_bytes,
        prefill=prefill,
        decode=decode,
        decode_step=step,
    )


@functools.lru_cache(maxsize=2)
def _device(cfg, dtype: str) -> NPU:
    """One NPU per chip and dtype: its plans serve every estimate made on it in this process."""
    return NPU(cfg, dtype=dtype)


@functools.lru_cache(maxsize=4)
def _group(cfg, tp: int, dtype: str) -> DeviceGroup:
    """One device group per chip, size and dtype: the collectives' plans, reused."""
    return DeviceGroup(cfg, tp, dtype=dtype)


class _Planner:
    """The kernel calls of ``Gemma3OnNPU.prefill`` / ``decode`` as (signature, consts), planned;
    with a device group, one device's share of them (Megatron-style) plus the collectives."""

    def __init__(
        self,
        npu: NPU,
        c: Gemma3TextConfig,
        embed_scale: float,
        batch: int,
        max_seq_len: int,
        group: DeviceGroup | None = None,
    ):
        self.npu, self.c, self.scale, self.batch = npu, c, embed_scale, batch
        self.group = group
        tp = group.num_devices if group else 1
        # The busiest device's share (gemma3.tensor_parallel.plan_shards, as the runtime splits):
        # heads, kv heads (replicated when fewer than devices), MLP columns, vocabulary rows.
        busiest = max(plan_shards(c, tp), key=lambda s: (len(s.q_heads), len(s.kv_heads)))
        self.hq, self.hkv = len(busiest.q_heads), len(busiest.kv_heads)
        self.ff = math.ceil(c.intermediate_size / tp)
        self.vocab = math.ceil(c.vocab_size / tp)
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
        self.lora: tuple[int, int] | None = None  # (rank, adapters with the base one)
        self.lora_targets: tuple[str, ...] = ()
        self.groups = 1  # adapter ids per lora call: 1 in prefill (one sequence), the batch in decode

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

    def weight_bytes(self) -> int:
        """The busiest device's weights: its shard of every projection and of the (tied)
        embedding, and every norm."""
        c, hd, d = self.c, self.c.head_dim, self.c.hidden_size
        per_layer = d * (self.hq + 2 * self.hkv) * hd + self.hq * hd * d + 3 * d * self.ff
        per_layer += 4 * d + 2 * hd
        embed = self.vocab * d * (1 if c.tie_word_embeddings else 2)
        return (c.num_hidden_layers * per_layer + embed + d) * (4 if self.dt == "fp32" else 2)

    def collective(self, phase, role, kernel, shape, times, dtype=None):
        """A collective of a (shape) tensor on every device, the faster algorithm on the link."""
        if self.group is None:
            return
        sig = [[(shape, dtype or self.dt)] * self.group.num_devices]
        phase.add_collective(role, fastest_algorithm(self.group, kernel, sig)[1], times)

    def layer(self, phase, i, t, attend, times):
        """One decoder layer on t rows, as ``Gemma3OnNPU._layer``; ``attend`` adds the attention."""
        c, f, eps = self.c, self.f, self.c.rms_norm_eps
        d, hq, hkv, hd = c.hidden_size, self.hq, self.hkv, c.head_dim
        norm = {"eps": eps}
        cos = f(c.max_position_embeddings, hd)
        self.add(phase, "norms", rmsnorm, [f(t, d), f(d)], norm, times)
        self.add(phase, "qkv_proj", matmul, [f(t, d), f(d, (hq + 2 * hkv) * hd)], None, times)
        for target, width in (("q", hq * hd), ("k", hkv * hd), ("v", hkv * hd)):
            self.add_lora(phase, target, t, d, width, times)
        self.add(phase, "norms", rmsnorm, [f(t, hq, hd), f(hd)], norm, times)
        self.add(phase, "norms", rmsnorm, [f(t, hkv, hd), f(hd)], norm, times)
        self.add(phase, "rope", rope, [f(t, hq, hd), cos, cos, self.i32(t)], None, times)
        self.add(phase, "rope", rope, [f(t, hkv, hd), cos, cos, self.i32(t)], None, times)
        attend(i)
        self.add(phase, "o_proj", matmul, [f(t, hq * hd), f(hq * hd, d)], None, times)
        self.add_lora(phase, "o", t, hq * hd, d, times)
        self.collective(phase, "all_reduce", all_reduce, (t, d), times)  # o_proj is row-split
        for _ in range(2):  # post-attention, pre-feedforward
            self.add(phase, "norms", rmsnorm, [f(t, d), f(d)], norm, times)
        f_ = self.ff
        if self.lora and set(self.lora_targets) & {"gate", "up", "down"}:  # unfused, as LoRAOnNPU.mlp
            for target in ("gate", "up"):
                self.add(phase, "mlp", matmul, [f(t, d), f(d, f_)], None, times)
                self.add_lora(phase, target, t, d, f_, times)
            self.add(phase, "mlp", geglu_combine, [f(t, f_), f(t, f_)], None, times)
            self.add(phase, "mlp", matmul, [f(t, f_), f(f_, d)], None, times)
            self.add_lora(phase, "down", t, f_, d, times)
        else:
            self.add(phase, "mlp", geglu_mlp, [f(t, d), f(d, f_), f(d, f_), f(f_, d)], None, times)
        self.collective(phase, "all_reduce", all_reduce, (t, d), times)  # down_proj is row-split
        self.add(phase, "norms", rmsnorm, [f(t, d), f(d)], norm, times)

    def add_lora(self, phase, target, t, din, dout, times):
        """The lora kernel after a projection an adapter targets: t rows, one adapter id per
        sequence (a decode step: each of its t rows; a prefill chunk: one)."""
        if not self.lora or target not in self.lora_targets:
            return
        r, n, f = *self.lora, self.f
        sig = [f(t, din), f(t, dout), f(n, din, r), f(n, dout, r), self.i32(self.groups)]
        self.add(phase, "lora", lora, sig, None, times)

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
        sig = [f(rows, c.hidden_size), f(c.hidden_size, self.vocab), self.i32(self.vocab)]
        self.add(phase, "lm_head", lm_head, sig, {"softcap": c.final_logit_softcapping}, times)
        # Each device's best logit and its id per row (fp32, int32: 4 bytes each) to every device.
        self.collective(phase, "all_gather", all_gather, (rows, 2), times, "fp32")

    def cache(self, i):
        c = self.c
        return self.f(self.batch, self.hkv, self.slots[i], c.head_dim)

    def prefill_chunk(self, phase, start, valid, size, n):
        """One prefill chunk of every sequence of the batch (they cost the same: sequence b's
        chunk differs from sequence 0's only in the cache rows it addresses)."""
        c, f, b = self.c, self.f, self.batch
        hq, hkv, hd = self.hq, self.hkv, c.head_dim
        phase.calls += b
        self.groups = 1
        self.add(
            phase,
            "embedding",
            embedding,
            [self.i32(size), f(self.vocab, c.hidden_size)],
            {"scale": self.scale},
            b,
        )
        self.collective(phase, "all_reduce", all_reduce, (size, c.hidden_size), b)  # vocab-split rows

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
        hq, hd = self.hq, c.head_dim
        phase.calls += 1
        self.groups = b
        self.add(
            phase,
            "embedding",
            embedding,
            [self.i32(b), f(self.vocab, c.hidden_size)],
            {"scale": self.scale},
        )
        self.collective(phase, "all_reduce", all_reduce, (b, c.hidden_size), 1)  # vocab-split rows

        def attend(i):
            cache, hkv = self.cache(i), self.hkv
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
