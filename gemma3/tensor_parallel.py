"""Tensor parallelism: the Gemma3 text model over a group of emulated devices, Megatron-style,
as vLLM and Optimum RBLN shard a decoder (``tensor_parallel_size`` / ``num_devices`` > 1).

The split (``plan_shards``), per device d of N:

* attention: a run of query heads. With at least N kv heads, the kv heads split near-equally
  and each device takes the query heads that read them (whole GQA groups); with fewer, the
  query heads split near-equally and each device holds the kv heads its query heads read (a kv
  head replicated on several devices). Where a device's query heads would read its kv heads
  unevenly (a group cut in two unequal parts), it holds one kv head per query head instead, so
  every device runs the same GQA kernel. q, k and v are column-split with the heads, o_proj
  row-split; the KV caches hold the device's kv heads.
* MLP: gate and up column-split, down row-split, near-equally over the intermediate width.
* vocabulary: the embedding's rows and the LM head's columns near-equally. A device looks up
  the ids in its rows (the others read a zero row it holds past them), the partial embeddings
  are all-reduced; the LM head gives each device the logits of its slice and the best logit and
  id of each row (ids global: its ``vocab_ids`` slice), and the (best, id) pairs are all-gathered,
  as the on-device argmax of a split vocabulary needs. The host reads each device's logits.
* norms, RoPE tables, and the residual stream: replicated.

A layer is three parts on every device (``Gemma3OnNPU._attention_block`` / ``_mlp_block`` /
``_residual``) with an all-reduce of the (tokens, hidden) activations after the first two:
o_proj's and down_proj's partial sums. The collectives run over the group's links
(``npu_emulator.group``, ``npu_kernels.collectives``), each the faster of the ring and the tree
for its size where the topology allows both (as NCCL picks), exactly as ``gemma3.estimate``
plans them. A step's emulated time is its critical path: every part costs what the busiest
device spends on it (the devices start each part together, after the collective before it),
plus the collectives; ``PhaseCost.split`` divides it into compute, memory and communication.

The vision tower of the image+text model runs on device 0, as in Optimum RBLN, whose SigLIP
has no tensor-parallel support (``_tp_support = False``: the field is dropped for it).

Backends (``backend``): "local" (default) keeps every device in this process; "ray" makes
each device a Ray actor holding its own shard (the weights, the KV caches, its NPU), so a model
whose weights exceed one host's memory spreads over a Ray cluster (``RAY_ADDRESS`` picks it;
without it Ray starts locally). The driver sends each part's inputs to the actors and the
collectives' partial sums come back through Ray's object store; the emulated cost is the same.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np

from npu_emulator import NPU, DeviceGroup
from npu_emulator.trace import write_group_sequence_trace
from npu_kernels.collectives import all_gather, all_reduce, fastest_algorithm
from npu_kernels.common import chunks

from .config import Gemma3TextConfig
from .rbln_config import BACKENDS
from .runtime import IMAGE_PREFILL, Gemma3OnNPU, PhaseCost

RAY_EXTRA = "pip install 'npu-gemma3[ray]'"


@dataclass(frozen=True)
class DeviceShard:
    """What device ``index`` holds: global query heads, the global kv head of each of its kv
    heads (repeated where replicated), and (start, length) of the MLP width and vocabulary."""

    index: int
    q_heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    ff: tuple[int, int]
    vocab: tuple[int, int]


def plan_shards(c: Gemma3TextConfig, tp: int) -> list[DeviceShard]:
    """The Megatron-style split of ``c`` over ``tp`` devices (module docstring)."""
    hq, hkv = c.num_attention_heads, c.num_key_value_heads
    for name, n, unit in (
        ("num_attention_heads", hq, "query head"),
        ("intermediate_size", c.intermediate_size, "MLP column"),
        ("vocab_size", c.vocab_size, "vocabulary row"),
    ):
        if n < tp:
            raise ValueError(
                f"tensor_parallel_size {tp} exceeds {name} {n}: every device needs at least one {unit}"
            )
    group = hq // hkv
    heads = []
    if hkv >= tp:  # whole GQA groups per device
        for k0, nk in chunks(hkv, tp):
            heads.append((tuple(range(k0 * group, (k0 + nk) * group)), tuple(range(k0, k0 + nk))))
    else:  # the query heads split; each device holds the kv heads they read
        for q0, nq in chunks(hq, tp):
            q = tuple(range(q0, q0 + nq))
            need = [j // group for j in q]
            kvs = sorted(set(need))
            even = len({need.count(k) for k in kvs}) == 1
            heads.append((q, tuple(kvs) if even else tuple(need)))
    ff, vocab = chunks(c.intermediate_size, tp), chunks(c.vocab_size, tp)
    return [DeviceShard(d, q, kv, ff[d], vocab[d]) for d, (q, kv) in enumerate(heads)]


def shard_config(c: Gemma3TextConfig, s: DeviceShard) -> Gemma3TextConfig:
    """The text config one device runs: its heads, MLP width and vocabulary slice (its LM head
    held explicitly: a tied one's slice is the embedding's rows, transposed)."""
    return dataclasses.replace(
        c,
        num_attention_heads=len(s.q_heads),
        num_key_value_heads=len(s.kv_heads),
        intermediate_size=s.ff[1],
        vocab_size=s.vocab[1],
        tie_word_embeddings=False,
    )


def shard_weights(c: Gemma3TextConfig, w: dict[str, np.ndarray], s: DeviceShard) -> dict[str, np.ndarray]:
    """Device ``s``'s slice of the device-layout weights ``w`` (``Gemma3OnNPU.device_weights``)."""
    hq, hkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim

    def cols(base, heads):
        return np.concatenate([base + np.arange(j * hd, (j + 1) * hd) for j in heads])

    qkv_cols = np.concatenate(
        [cols(0, s.q_heads), cols(hq * hd, s.kv_heads), cols((hq + hkv) * hd, s.kv_heads)]
    )
    o_rows = cols(0, s.q_heads)
    (f0, nf), (v0, nv) = s.ff, s.vocab
    out = {}
    for name, a in w.items():
        kind = name.rsplit(".", 1)[-1]
        if ".lora_" in name:
            raise NotImplementedError(
                f"{name}: LoRA with tensor parallelism is not built (shard it per device)"
            )
        if name == "embed":  # its rows, then one zero row the ids of other devices read
            table = np.zeros((nv + 1, a.shape[1]), np.float32)
            table[:nv] = a[v0 : v0 + nv]
            out[name] = table
        elif name == "lm_head":
            out[name] = a[:, v0 : v0 + nv]
        elif name == "vocab_ids":
            out[name] = np.ascontiguousarray(a[v0 : v0 + nv])
        elif kind == "qkv":
            out[name] = a[:, qkv_cols]
        elif kind == "o":
            out[name] = a[o_rows]
        elif kind in ("gate", "up"):
            out[name] = a[:, f0 : f0 + nf]
        elif kind == "down":
            out[name] = a[f0 : f0 + nf]
        else:  # norms, RoPE tables: replicated
            out[name] = a
    if "lm_head" not in out:  # tied: the embedding's slice, transposed
        out["lm_head"] = w["embed"][v0 : v0 + nv].T
    return out


def unshard_weights(
    c: Gemma3TextConfig, shards: list[DeviceShard], parts: list[dict]
) -> dict[str, np.ndarray]:
    """The device-layout weights from every device's slice (the inverse of ``shard_weights``;
    a replicated tensor from device 0). A tied LM head is left out, as ``device_weights``."""
    hq, hkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    out = {}
    for name, a0 in parts[0].items():
        kind = name.rsplit(".", 1)[-1]
        if name == "embed":
            out[name] = np.concatenate([p[name][: s.vocab[1]] for s, p in zip(shards, parts)])
        elif name == "lm_head":
            if not c.tie_word_embeddings:
                out[name] = np.concatenate([p[name] for p in parts], axis=1)
        elif name == "vocab_ids":
            out[name] = np.concatenate([p[name] for p in parts])
        elif kind == "qkv":
            q = np.empty((a0.shape[0], hq * hd), a0.dtype)
            k = np.empty((a0.shape[0], hkv * hd), a0.dtype)
            v = np.empty_like(k)
            for s, p in zip(shards, parts):
                a, nq, nk = p[name], len(s.q_heads), len(s.kv_heads)
                for j, head in enumerate(s.q_heads):
                    q[:, head * hd : (head + 1) * hd] = a[:, j * hd : (j + 1) * hd]
                for j, head in enumerate(s.kv_heads):  # a replicated head: any copy
                    k[:, head * hd : (head + 1) * hd] = a[:, (nq + j) * hd : (nq + j + 1) * hd]
                    v[:, head * hd : (head + 1) * hd] = a[:, (nq + nk + j) * hd : (nq + nk + j + 1) * hd]
            out[name] = np.concatenate([q, k, v], axis=1)
        elif kind in ("o", "down"):
            out[name] = np.concatenate([p[name] for p in parts])
        elif kind in ("gate", "up"):
            out[name] = np.concatenate([p[name] for p in parts], axis=1)
        else:
            out[name] = a0
    return out


def strip(report):
    """A report without its schedule (what travels between processes)."""
    return dataclasses.replace(report, schedule=None, stream=None)


class ShardWorker(Gemma3OnNPU):
    """One device of the group: its NPU, its slice of the weights, its KV caches. The driver
    (``TensorParallelGemma3``) calls ``part`` for each part of a step; each returns its result
    and the reports of the kernels it ran."""

    def __init__(self, config, rbln, weights, shard: DeviceShard, share_plans: dict | None = None):
        super().__init__(config, rbln, weights, device=shard.index)
        if share_plans is not None:  # in-process devices of one chip share their plans
            self.npu._plans = share_plans
        self.shard = shard
        self.host_decode = None  # the driver runs the steps part by part

    def _embed(self, phase, ids):
        v0, nv = self.shard.vocab
        local = np.asarray(ids, np.int64) - v0
        local = np.where((local >= 0) & (local < nv), local, nv)  # others' ids: the zero row
        return super()._embed(phase, local)

    def part(self, name: str, phase: str, *args, padded_rows=None, strip_reports=False):
        cost = self.cost[phase]
        first = len(cost.reports)
        self.padded_rows = padded_rows
        try:
            out = getattr(self, "_part_" + name)(phase, *args)
        finally:
            self.padded_rows = None
        reports = cost.reports[first:]
        del cost.reports[first:]
        return out, [strip(r) for r in reports] if strip_reports else reports

    def _attend(self, phase, how):
        kind, *args = how
        if kind == "prefill":
            return Gemma3OnNPU._chunk_attention(self, phase, *args)
        return Gemma3OnNPU._decode_attention(self, *args)

    def _part_embed(self, phase, ids):
        return self._embed(phase, ids)

    def _part_attention(self, phase, i, x, positions, how):
        return self._attention_block(phase, i, x, positions, self._attend(phase, how))

    def _part_mlp(self, phase, i, x, o):
        return self._mlp_block(phase, i, x, o)

    def _part_residual(self, phase, i, x, m):
        return self._residual(phase, i, x, m)

    def _part_logits(self, phase, x_last):
        return self._lm_head(phase, x_last)

    def call(self, method: str, *args):
        """A method that adds no cost (planning, reset, export)."""
        return getattr(self, method)(*args)

    def export(self) -> dict[str, np.ndarray]:
        return {name: t.numpy() for name, t in self.weights.items()}

    def dtypes(self) -> dict[str, str]:
        return {name: t.dtype for name, t in self.weights.items()}


class _Local:
    """Every device in this process."""

    name = "local"

    def __init__(self, config, rbln, shards, parts, plans):
        self.workers = []
        for s in shards:
            self.workers.append(ShardWorker(shard_config(config, s), rbln, parts(s), s, plans))

    def part(self, name, phase, args, padded_rows):
        return [w.part(name, phase, *a, padded_rows=padded_rows) for w, a in zip(self.workers, args)]

    def call(self, method, *args):
        return [w.call(method, *args) for w in self.workers]


class _Ray:
    """Every device a Ray actor (module docstring)."""

    name = "ray"

    def __init__(self, config, rbln, shards, parts, plans):
        try:
            import ray
        except ImportError:
            raise ImportError(
                f"backend='ray' needs Ray, an optional extra: {RAY_EXTRA} (or backend='local')"
            ) from None
        self.ray = ray
        if not ray.is_initialized():
            # RAY_ADDRESS (read by ray.init) joins a cluster; without it Ray starts here.
            local = not os.environ.get("RAY_ADDRESS")
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report over the network
            ray.init(
                include_dashboard=False,
                log_to_driver=False,
                ignore_reinit_error=True,
                configure_logging=False,
                **({"num_cpus": os.cpu_count() or 1} if local else {}),
            )
        # The actors hold memory, not cores: none is reserved (N devices on a 2-core host), and
        # on a cluster they spread over the nodes.
        actor = ray.remote(num_cpus=0, scheduling_strategy="SPREAD")(ShardWorker)
        self.workers = [actor.remote(shard_config(config, s), rbln, parts(s), s) for s in shards]
        self._get([w.call.remote("dtypes") for w in self.workers])  # construction errors surface here

    def _get(self, refs):
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else None
            if cause is not None:
                raise cause from None
            raise

    def part(self, name, phase, args, padded_rows):
        refs = [
            w.part.remote(name, phase, *a, padded_rows=padded_rows, strip_reports=True)
            for w, a in zip(self.workers, args)
        ]
        return self._get(refs)

    def call(self, method, *args):
        return self._get([w.call.remote(method, *args) for w in self.workers])


class _HostTensor:
    """A weight as the save path reads it (``numpy()`` and ``dtype``), gathered from the devices."""

    def __init__(self, data, dtype):
        self.data, self.dtype, self.shape = data, dtype, data.shape

    def numpy(self):
        return self.data


class TensorParallelGemma3(Gemma3OnNPU):
    """``Gemma3OnNPU`` over ``rbln.devices`` devices: the driver of the group (module docstring).
    Prefill and decode are ``Gemma3OnNPU``'s; the embedding, each layer's parts, the logits
    and the planning fan out to the devices, with the collectives between them."""

    def __init__(self, config: Gemma3TextConfig, rbln, weights: dict[str, np.ndarray]):
        tp = rbln.devices
        if rbln.lora_config is not None:
            raise NotImplementedError(
                f"lora_config with tensor_parallel_size {tp}: LoRA on sharded projections is not built; use 1"
            )
        backend = rbln.backend or "local"
        self.c, self.rbln = config, rbln
        self.max_seq_len = rbln.max_seq_len or config.max_position_embeddings
        self.shards = plan_shards(config, tp)
        self.group = DeviceGroup(rbln.npu_config, tp, mode=rbln.mode, numerics=rbln.numerics)
        plans: dict = {}
        parts = lambda s: shard_weights(config, weights, s)  # noqa: E731 - one device's at a time
        self.devices = (_Ray if backend == "ray" else _Local)(config, rbln, self.shards, parts, plans)
        if backend == "ray":
            self.npu = NPU(rbln.npu_config, mode=rbln.mode, numerics=rbln.numerics)
        else:  # device 0 (the vision tower's too), whose plans every device shares
            self.npu = self.devices.workers[0].npu
        self.aliases = set()
        self.window = config.sliding_window
        self.positions = np.zeros(rbln.batch_size, np.int64)
        self.cost = {phase: PhaseCost() for phase in ("prefill", IMAGE_PREFILL, "decode")}
        self.lora = None
        self.padded_rows = None
        self.host_decode = None
        self.partition = None

    @property
    def backend(self) -> str:
        return self.devices.name

    @property
    def weights(self) -> dict:
        """Every weight in the single-device layout, gathered from the devices (for saving)."""
        parts = self.devices.call("export")
        dtypes = self.devices.call("dtypes")[0]
        full = unshard_weights(self.c, self.shards, parts)
        return {n: _HostTensor(a, dtypes[n]) for n, a in full.items()}

    # ------------------------------------------------------------------ parts and collectives

    def _fan(self, name, phase, args):
        """Part ``name`` on every device (``args``: one tuple per device); the phase costs the
        busiest device's reports. Returns the devices' results."""
        results = self.devices.part(name, phase, args, self.padded_rows)
        costs = [sum(r.cycles for r in reps) for _, reps in results]
        busiest = int(np.argmax(costs))
        self.cost[phase].reports.extend(results[busiest][1])
        self.cost[phase].timeline.append(("part", name, [reps for _, reps in results]))
        return [out for out, _ in results]

    def _collective(self, phase, kernel, parts, dtype=None):
        """``kernel`` (all_reduce, all_gather) over the group on ``parts`` (one array per
        device, held as ``dtype``, default the device dtype), the faster algorithm on the link
        for its shape; costed as communication. Returns one array per device."""
        group = self.group
        dtype = dtype or group.dtype
        shape = parts[0].shape
        if self.padded_rows is not None:  # valid rows of a padded chunk: cost the chunk's rows
            shape = (self.padded_rows, *shape[1:])
        algorithm, planned = fastest_algorithm(group, kernel, [[(shape, dtype)] * group.num_devices])
        held = group.shard(parts, dtype, name=kernel.name)
        try:
            out, ran = group.run(kernel, held, algorithm=algorithm)
        finally:
            for t in held:
                t.npu.free(t)
        # The run's report, unless it ran fewer rows than the chip's padded chunk.
        self.cost[phase].add_collective(ran if self.padded_rows is None else planned)
        return out

    def _embed(self, phase, ids):
        n = self.group.num_devices
        parts = self._fan("embed", phase, [(ids,)] * n)
        return self._collective(phase, all_reduce, parts)[0]

    def _chunk_attention(self, phase, b, start, valid, positions, blocks):
        return ("prefill", b, start, valid, positions, blocks)

    def _decode_attention(self, n, pos):
        return ("decode", n, pos)

    def _layer(self, phase, i, x, positions, attend):
        n = self.group.num_devices
        o = self._fan("attention", phase, [(i, x, positions, attend)] * n)
        o = self._collective(phase, all_reduce, o)
        xm = self._fan("mlp", phase, [(i, x, o[d]) for d in range(n)])
        m = self._collective(phase, all_reduce, [m for _, m in xm])
        x = xm[0][0]
        return self._fan("residual", phase, [(i, x, m[d]) for d in range(n)])[0]

    def _logits(self, phase, x_last):
        n = self.group.num_devices
        parts = self._fan("logits", phase, [(x_last,)] * n)
        # Each row's best logit and its (global) id, from every device to every device.
        best = [np.stack([lg.max(axis=1), ids.astype(np.float32)], axis=1) for lg, ids in parts]
        self._collective(phase, all_gather, best, "fp32")
        return np.concatenate([lg for lg, _ in parts], axis=1)  # the host reads each device's slice

    # ------------------------------------------------------------------ planning, state

    def reset(self):
        super().reset()
        self.devices.call("reset")

    def write_trace(self, path, phases=("prefill", IMAGE_PREFILL, "decode"), name: str = "generate") -> str:
        """The phases' timeline as Perfetto JSON: every device's kernels (and, where planned in
        this process, its engines and DMA queues), and the collectives on the links."""
        steps = [s for p in phases for s in self.cost[p].timeline]
        return write_group_sequence_trace(path, steps, name=name)

    def _plan_largest_attention(self) -> None:
        self.devices.call("_plan_largest_attention")

    def plan_every_shape(self) -> None:
        self.devices.call("plan_every_shape")

    def _plan_prefill_attention(self, size: int, q_start: int, image_blocks=()) -> None:
        self.devices.call("_plan_prefill_attention", size, q_start, image_blocks)


def build_runtime(config: Gemma3TextConfig, rbln, weights: dict[str, np.ndarray]) -> Gemma3OnNPU:
    """The model on one device, or over ``rbln.devices`` of them."""
    if rbln.devices > 1:
        return TensorParallelGemma3(config, rbln, weights)
    return Gemma3OnNPU(config, rbln, weights)


__all__ = [
    "BACKENDS",
    "DeviceShard",
    "ShardWorker",
    "TensorParallelGemma3",
    "build_runtime",
    "plan_shards",
    "shard_config",
    "shard_weights",
    "unshard_weights",
]
