"""Gemma3OnNPU: the Gemma3 text model on the emulated NPU, the runtime the facade drives
(``gemma3/facade.py``): every layer a kernel from the library.

Compiled state (``CompiledGemma3``): weights in device layout in the NPU's DRAM (projections
pre-transposed to (in, out); q, k and v fused into one (hidden, (Hq + 2 Hkv) * head_dim)
matrix; the tied embedding twice: (vocab, hidden) for the lookup and (hidden, vocab) for the
LM head), RoPE tables per layer type, and the KV caches:

    global layers:  (batch, kv_heads, max_seq_len, head_dim), slot = position
    sliding layers: (batch, kv_heads, ring, head_dim), slot = position % ring

Caches hold whole decode KV tiles (``decode_kv_tile``: the decode kernel reads whole tiles):
max_seq_len and the ring are rounded up to them, ring = ceil(sliding_window / tile) * tile,
so any positive sliding_window works. The ring's slots past the window hold the positions just
before it, which every mask hides. A sliding layer whose ring would be no smaller than the
global cache (a window near or past max_seq_len) keeps every position as a global layer does,
and its masks keep the window.

Prefill runs one sequence at a time, in chunks of ``prefill_chunk_size`` tokens (the last one
padded to the full chunk: shapes are static as on the real NPU), and computes logits for the
last valid token only. Decode runs the whole batch one token per step.

Images (the image+text model, ``gemma3/multimodal.py``): ``prefill(b, ids, images=[(start,
features), ...])`` takes, for each image, where its run of soft tokens starts in ``ids`` and its
projected features (T, hidden), T = ``image_prefill_chunk_size`` (= mm_tokens_per_image). The
prompt is cut into text chunks of ``prefill_chunk_size`` and, for each image, one chunk of T
rows exactly covering its soft tokens: those rows are the features themselves (no embedding
lookup), and the attention kernel gets the image as an ``image_blocks`` range, so its tokens see
each other both ways (and the text before them causally) on every layer. On sliding layers
the window bounds that too, as in transformers (``AND(window, OR(causal, block))``): an image
longer than the window sees, from each of its tokens, its later tokens and the window before.
Chunks holding an image cost under the phase "image prefill", text chunks under "prefill".
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Mapping

import numpy as np

from npu_emulator import NPU, Buffer, CycleReport, DeviceTensor, EmulatorError
from npu_emulator.memory import DRAM
from npu_kernels.attention_decode import attention_decode, decode_kv_tile
from npu_kernels.attention_decode_flash import attention_decode_flash, flash_decode_length
from npu_kernels.attention_prefill import attention_prefill
from npu_kernels.embedding import embedding
from npu_kernels.kvcache import kv_cache_write
from npu_kernels.lm_head import lm_head
from npu_kernels.matmul import matmul
from npu_kernels.mlp import geglu_mlp
from npu_kernels.norms import rmsnorm
from npu_kernels.rope import rope as rope_kernel
from npu_kernels.rope import rope_tables

from .config import FULL, SLIDING, Gemma3TextConfig
from .host_step import CHUNK_ROW_INPUTS, HostDecode, run_valid_rows
from .lora import LoRAOnNPU
from .progress import progress
from .rbln_config import NPUGemma3ForCausalLMConfig

IMAGE_PREFILL = "image prefill"  # the cost phase of prefill chunks holding an image's tokens


def is_matrix(name: str) -> bool:
    """Device weights read by products (matmul, MLP, LM head): held column-major on the host."""
    return name == "lm_head" or name.rsplit(".", 1)[-1] in ("qkv", "o", "gate", "up", "down")


MEMORY_UNITS = ("dram", "shared_sram", "host_link")


def memory_bound(report: CycleReport) -> bool:
    """Whether a kernel's binding unit is the memory system (DRAM, SRAM, a DMA queue)."""
    unit = report.binding_unit
    return unit in MEMORY_UNITS or unit.startswith("dma.")


class LazyWeights(Mapping):
    """Name -> weight, each made when read and not kept (``device_weights``): a checkpoint's
    tensors converted one at a time, so building a model, or one device's slice of it, holds
    one converted tensor at once. Set a name to an array or to a function making it."""

    def __init__(self):
        self._make: dict[str, Callable[[], np.ndarray]] = {}

    def __setitem__(self, name: str, value) -> None:
        self._make[name] = value if callable(value) else (lambda: value)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._make[name]()

    def __iter__(self):
        return iter(self._make)

    def __len__(self) -> int:
        return len(self._make)

    def update(self, other) -> None:
        for name, value in other.items():
            self[name] = value


class PhaseCost:
    """Collects the reports of the kernels one phase (prefill or decode) ran."""

    def __init__(self):
        self.reports: list[CycleReport] = []
        self.seconds = 0.0  # host time spent in the phase, where the runner measures it
        self.collectives: list[CycleReport] = []  # of ``reports``: the collectives (tensor parallel)
        # Tensor parallel: every device's reports per part and the collectives' GroupReports, in
        # order (npu_emulator.trace.write_group_sequence_trace draws them).
        self.timeline: list[tuple] = []

    def add(self, report: CycleReport):
        self.reports.append(report)

    def add_collective(self, report) -> None:
        """A collective's ``GroupReport``: its cycles on the group's critical path, as the
        report of one device over the collective's span."""
        r = dataclasses.replace(
            report.devices[0], name=report.name, cycles=report.cycles, schedule=None, stream=None
        )
        self.reports.append(r)
        self.collectives.append(r)
        self.timeline.append(("collective", report))

    def clear(self) -> None:
        self.reports.clear()
        self.collectives.clear()
        self.timeline.clear()
        self.seconds = 0.0

    def split(self) -> dict[str, float]:
        """Shares (0-1) of the phase's cycles: kernels bound by a compute unit, by the memory
        system (DRAM, SRAM, a DMA queue), and the collectives over the links."""
        comm = {id(r) for r in self.collectives}
        cycles = {"compute": 0, "memory": 0, "communication": 0}
        for r in self.reports:
            kind = "communication" if id(r) in comm else "memory" if memory_bound(r) else "compute"
            cycles[kind] += r.cycles
        total = max(sum(cycles.values()), 1)
        return {k: v / total for k, v in cycles.items()}

    def total(self, name: str) -> CycleReport | None:
        return CycleReport.sequence(name, self.reports) if self.reports else None


class Gemma3OnNPU:
    """Runs prefill and decode for a compiled model; holds the KV caches of one batch."""

    valid_rows_only = True  # fast mode: a padded prefill chunk computes its valid rows (host_step)

    def __init__(
        self,
        config: Gemma3TextConfig,
        rbln: NPUGemma3ForCausalLMConfig,
        weights: dict[str, np.ndarray],
        device: int | None = None,
    ):
        self.c = config
        self.rbln = rbln
        self.max_seq_len = rbln.max_seq_len or config.max_position_embeddings
        self.npu = NPU(rbln.npu_config, mode=rbln.mode, numerics=rbln.numerics)
        if device is not None:  # one device of a tensor-parallel group: capacity errors name it
            self.npu.dram.label = f"DRAM of device {device} of {rbln.devices}"
        # Host copies: matrices column-major and, under bf16 numerics, in bf16 (exact there):
        # decode streams each once per token (see npu_kernels/hostmath.py). Cycles do not change.
        self.aliases = {"lm_head"} if config.tie_word_embeddings else set()
        names = [n for n in weights if n not in self.aliases]  # (older saves wrote a tied one)
        self.weights = {}
        for name in progress(names, "weights to DRAM"):  # one host tensor at a time (LazyWeights)
            a = weights[name]
            self.weights[name] = self.npu.to_device(
                a, name=name, compact=a.ndim == 2, column_major=is_matrix(name)
            )
        if self.aliases:  # the tied LM head reads the embedding's host copy, transposed
            self.weights["lm_head"] = self.npu.to_device(
                self.weights["embed"].numpy().T, name="lm_head", compact=True, column_major=True, copy=False
            )
        self.window = config.sliding_window
        self.kv_tile = decode_kv_tile(self.npu.config)
        self.partition = self._flash_partition()  # flash_attn: see "flash attention" below
        # Caches hold whole KV tiles (module docstring): global slots past max_seq_len are never
        # visible, ring slots past the window hold positions before it, hidden by the masks.
        self.global_slots = math.ceil(self.max_seq_len / self.kv_tile) * self.kv_tile
        self.ring_slots = math.ceil(self.window / self.kv_tile) * self.kv_tile
        self.caches = []
        for i in range(config.num_hidden_layers):
            slots = self.ring_slots if self.ring(i) else self.global_slots
            shape = (rbln.batch_size, config.num_key_value_heads, slots, config.head_dim)
            zeros = np.zeros(shape, np.float32)
            self.caches.append(
                (self.npu.to_device(zeros, name=f"k_cache{i}"), self.npu.to_device(zeros, name=f"v_cache{i}"))
            )
        self.positions = np.zeros(rbln.batch_size, np.int64)  # next position of each sequence
        self.cost = {"prefill": PhaseCost(), IMAGE_PREFILL: PhaseCost(), "decode": PhaseCost()}
        # LoRA (gemma3/lora.py): the hook that adds each row's adapter to the projections.
        self.lora = LoRAOnNPU(self, rbln.batch_size) if rbln.lora_config is not None else None
        self.padded_rows = None  # set while a prefill chunk runs its valid rows only (host_step)
        # host_step: fast-mode decode steps of the whole compiled batch without the per-kernel run
        # path (None: per kernel). It runs the plain model: LoRA and flash attention go per kernel.
        plain = self.lora is None and self.partition is None
        self.host_decode = HostDecode(self) if self.npu.mode == "fast" and plain else None

    def ring(self, layer: int) -> bool:
        """Whether a layer's cache is a ring buffer of ``ring_slots`` (the window in whole KV
        tiles: a sliding layer whose ring is smaller than the global cache) or holds every
        position."""
        return self.c.is_sliding(layer) and self.ring_slots < self.global_slots

    # ------------------------------------------------------------------ device layout

    @staticmethod
    def device_weights(c: Gemma3TextConfig, get) -> LazyWeights:
        """Checkpoint tensors (names as weights.expected_shapes) -> device layout, fp32, as a
        ``LazyWeights``: each made from ``get`` when read.

        Projections are (in, out): the transposed views of the checkpoint's (out, in)
        tensors (no copy here; the upload keeps them column-major). A tied LM head is not
        listed: it is the embedding, transposed."""
        w = LazyWeights()
        w["embed"] = lambda: get("embed_tokens.weight")
        w["norm"] = lambda: get("norm.weight")
        if not c.tie_word_embeddings:
            w["lm_head"] = lambda: get("lm_head.weight").T
        w["vocab_ids"] = lambda: np.arange(c.vocab_size, dtype=np.int32)  # ids the on-device argmax looks up
        for layer_type, rope in c.rope.items():
            tables = functools.cache(
                lambda r=rope: rope_tables(c.max_position_embeddings, c.head_dim, r.theta, r.factor)
            )
            w[f"cos_{layer_type}"] = lambda t=tables: t()[0]
            w[f"sin_{layer_type}"] = lambda t=tables: t()[1]
        for i in range(c.num_hidden_layers):
            p = f"layers.{i}."
            # (hidden, (Hq + 2 Hkv) * hd): q, k and v fused
            w[f"{i}.qkv"] = lambda p=p: (
                np.concatenate([get(p + f"self_attn.{n}_proj.weight") for n in ("q", "k", "v")], axis=0).T
            )
            w[f"{i}.o"] = lambda p=p: get(p + "self_attn.o_proj.weight").T
            for n in ("gate", "up", "down"):
                w[f"{i}.{n}"] = lambda p=p, n=n: get(p + f"mlp.{n}_proj.weight").T
            for n in (
                "input_layernorm",
                "post_attention_layernorm",
                "pre_feedforward_layernorm",
                "post_feedforward_layernorm",
            ):
                w[f"{i}.{n}"] = lambda p=p, n=n: get(p + n + ".weight")
            for n in ("q_norm", "k_norm"):
                w[f"{i}.{n}"] = lambda p=p, n=n: get(p + f"self_attn.{n}.weight")
        return w

    # ------------------------------------------------------------------ kernels

    def _run(self, phase, kernel, *inputs, **consts):
        try:
            if self.padded_rows is None or kernel.name not in CHUNK_ROW_INPUTS:
                out, report = self.npu.run(kernel, *inputs, **consts)
            else:  # host_step: the valid rows of a padded prefill chunk, costed as the whole chunk
                out, report = run_valid_rows(self.npu, kernel, inputs, consts, self.padded_rows)
        except EmulatorError as e:
            rows = CHUNK_ROW_INPUTS.get(kernel.name, ()) if self.padded_rows is not None else ()
            shapes = [
                (self.padded_rows, *x.shape[1:]) if j in rows else tuple(x.shape)
                for j, x in enumerate(inputs)
            ]
            raise type(e)(f"kernel {kernel.name} on inputs {', '.join(map(str, shapes))}: {e}") from None
        self.cost[phase].add(report)
        return out

    def _layer(self, phase, i, x, positions, attend):
        """One decoder layer on x (T, hidden); ``attend(q, k, v)`` does the attention. In three
        parts, the seams where a tensor-parallel model all-reduces (gemma3/tensor_parallel.py)."""
        o = self._attention_block(phase, i, x, positions, attend)
        x, m = self._mlp_block(phase, i, x, o)
        return self._residual(phase, i, x, m)

    def _attention_block(self, phase, i, x, positions, attend):
        """Input norm, q/k/v, their norms and RoPE, the attention and o_proj: o (T, hidden)."""
        c, w, eps = self.c, self.weights, self.c.rms_norm_eps
        t = x.shape[0]
        hq, hkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        kind = c.layer_types[i]
        h = self._run(phase, rmsnorm, x, w[f"{i}.input_layernorm"], eps=eps)
        qkv = self._run(phase, matmul, h, w[f"{i}.qkv"])  # (T, (Hq + 2 Hkv) * hd)
        if self.lora:
            qkv = self.lora.qkv(phase, i, h, qkv)
        q = qkv[:, : hq * hd].reshape(t, hq, hd)
        k = qkv[:, hq * hd : (hq + hkv) * hd].reshape(t, hkv, hd)
        v = np.ascontiguousarray(qkv[:, (hq + hkv) * hd :].reshape(t, hkv, hd))
        q = self._run(phase, rmsnorm, np.ascontiguousarray(q), w[f"{i}.q_norm"], eps=eps)
        k = self._run(phase, rmsnorm, np.ascontiguousarray(k), w[f"{i}.k_norm"], eps=eps)
        pos = positions.astype(np.int32)
        q = self._run(phase, rope_kernel, q, w[f"cos_{kind}"], w[f"sin_{kind}"], pos)
        k = self._run(phase, rope_kernel, k, w[f"cos_{kind}"], w[f"sin_{kind}"], pos)
        a = attend(i, q, k, v)  # (T, Hq * hd)
        o = self._run(phase, matmul, a, w[f"{i}.o"])
        if self.lora:
            o = self.lora.add(phase, i, "o", a, o)
        return o

    def _mlp_block(self, phase, i, x, o):
        """The attention's output into the residual, then the MLP: (x, m (T, hidden))."""
        w, eps = self.weights, self.c.rms_norm_eps
        x = x + self._run(phase, rmsnorm, o, w[f"{i}.post_attention_layernorm"], eps=eps)
        h = self._run(phase, rmsnorm, x, w[f"{i}.pre_feedforward_layernorm"], eps=eps)
        if self.lora and self.lora.targets_mlp(i):
            m = self.lora.mlp(phase, i, h)
        else:
            m = self._run(phase, geglu_mlp, h, w[f"{i}.gate"], w[f"{i}.up"], w[f"{i}.down"])
        return x, m

    def _residual(self, phase, i, x, m):
        """The MLP's output into the residual: the layer's output."""
        return x + self._run(
            phase, rmsnorm, m, self.weights[f"{i}.post_feedforward_layernorm"], eps=self.c.rms_norm_eps
        )

    def _logits(self, phase, x_last):
        return self._lm_head(phase, x_last)[0]

    def _lm_head(self, phase, x_last):
        """The final norm and the LM head: (logits, each row's argmax id)."""
        w = self.weights
        h = self._run(phase, rmsnorm, x_last, w["norm"], eps=self.c.rms_norm_eps)
        return self._run(
            phase, lm_head, h, w["lm_head"], w["vocab_ids"], softcap=self.c.final_logit_softcapping
        )

    def _embed(self, phase, ids):
        return self._run(
            phase, embedding, ids.astype(np.int32), self.weights["embed"], scale=self.c.embed_scale
        )

    def _write_cache(self, phase, i, b0, k, v, positions, caches=None):
        """k, v (B', T, Hkv, hd) for batch rows b0.. at positions (B', T) (of ``caches``, by
        default layer i's)."""
        c = self.c
        k_cache, v_cache = caches or self.caches[i]
        hkv, s = c.num_key_value_heads, k_cache.shape[2]
        slots = positions % s if self.ring(i) else positions  # (B', T)
        seq = np.arange(b0, b0 + k.shape[0])[:, None, None]
        rows = ((seq * hkv + np.arange(hkv)[None, None, :]) * s + slots[:, :, None]).astype(
            np.int32
        )  # (B', T, Hkv)
        self._run(phase, kv_cache_write, k_cache, k, rows)
        self._run(phase, kv_cache_write, v_cache, v, rows)

    # ------------------------------------------------------------------ prefill / decode

    def reset(self):
        self.positions[:] = 0
        self.padded_rows = None  # (a prefill that raised mid-chunk left it set)
        for cost in self.cost.values():
            cost.clear()

    def prefill(self, b: int, ids: np.ndarray, images=(), embeds=None, hidden_states=None) -> np.ndarray:
        """Prefill sequence ``b`` with ``ids`` (its real tokens); return last-token logits (V,).

        ``images``: (start, features) per image, in order: the image's soft tokens are
        ``ids[start : start + T]`` and their rows are ``features`` (T, hidden) instead of
        embeddings (module docstring). Without images this is the text model's prefill.
        ``embeds`` (n, hidden): the text rows themselves in place of the embedding lookup
        (``use_inputs_embeds``). ``hidden_states``: a list that receives the embeddings and
        every layer's output over the n tokens, each (n, hidden)."""
        c = self.c
        n = len(ids)
        if n > self.max_seq_len:
            raise ValueError(f"prompt of {n} tokens exceeds max_seq_len {self.max_seq_len}")
        images = self._check_images(n, images)
        if embeds is not None and np.shape(embeds) != (n, c.hidden_size):
            raise ValueError(f"embeds {np.shape(embeds)} must be ({n}, {c.hidden_size}): one row per token")
        layers = [[] for _ in range(c.num_hidden_layers + 1)] if hidden_states is not None else None
        logits = None
        for start, valid, size, features in self._chunks(n, images):
            phase = "prefill" if features is None else IMAGE_PREFILL
            t0 = time.perf_counter()
            positions = start + np.arange(size)
            # padding rows: any position the RoPE tables hold (their results are never used)
            positions[valid:] = np.minimum(positions[valid:], c.max_position_embeddings - 1)
            # host_step: fast mode computes only the valid rows of a padded chunk, costed as padded
            # (LoRA's kernels run the whole chunk: their row-to-adapter map is the chunk's.)
            rows = valid if self.npu.mode == "fast" and self.valid_rows_only and not self.lora else size
            positions = positions[:rows]
            self.padded_rows = size if rows < size else None
            if features is None:
                chunk_ids = np.zeros(rows, np.int64)
                chunk_ids[:valid] = ids[start : start + valid]
                if embeds is None:
                    x = self._embed(phase, chunk_ids)
                else:  # embedded on the host, as the real runtime's inputs_embeds prefill
                    x = np.zeros((rows, c.hidden_size), np.float32)
                    x[:valid] = embeds[start : start + valid]
                blocks = ()
            else:  # the image's features replace the embeddings of its soft tokens
                x = features
                blocks = ((start, start + size),)

            attend = self._chunk_attention(phase, b, start, valid, positions, blocks)
            if self.lora:
                self.lora.select(slice(b, b + 1))
            for i in range(c.num_hidden_layers):
                if layers is not None:
                    layers[i].append(np.array(x[:valid], np.float32))
                x = self._layer(phase, i, x, positions, attend)
            self.padded_rows = None
            if layers is not None:
                layers[-1].append(np.array(x[:valid], np.float32))
            if start + valid == n:
                logits = self._logits(phase, x[valid - 1 : valid])[0]
            self.cost[phase].seconds += time.perf_counter() - t0
        self.positions[b] = n
        if layers is not None:
            hidden_states.extend(np.concatenate(rows) for rows in layers)
        return logits

    def _prefill_consts(self, i: int, q_start: int, batch: int, image_blocks=()) -> dict:
        """The prefill attention's consts on layer i (run and planned alike: the plan is found
        by them)."""
        consts = dict(
            q_start=q_start,
            scale=self.c.attention_scale,
            window=self.window if self.c.is_sliding(i) else None,
            ring=self.ring(i),
            batch=batch,
        )
        if image_blocks:
            consts["image_blocks"] = image_blocks
        return consts

    def _chunk_attention(self, phase, b, start, valid, positions, blocks):
        """The ``attend(i, q, k, v)`` of one prefill chunk of sequence ``b``: the attention kernel
        over the chunk and the cache, then the chunk's valid keys and values into the cache."""

        def attend(i, q, k, v):
            k_cache, v_cache = self.caches[i]
            consts = self._prefill_consts(i, start, b, blocks)
            out = self._run(phase, attention_prefill, q, k, v, k_cache, v_cache, **consts)
            self._write_cache(phase, i, b, k[None, :valid], v[None, :valid], positions[None, :valid])
            return out.reshape(q.shape[0], -1)

        return attend

    @property
    def image_chunk(self) -> int:
        """Rows of an image's prefill chunk: ``image_prefill_chunk_size`` (mm_tokens_per_image)."""
        size = self.rbln.image_prefill_chunk_size
        if size is None:
            raise ValueError("this model was not configured for images (image_prefill_chunk_size is unset)")
        return size

    def check_image_chunk(self) -> None:
        """Refuse an image chunk that does not fit the compiled sequence."""
        size = self.image_chunk
        if size > self.max_seq_len:
            raise ValueError(f"an image's {size} tokens exceed max_seq_len {self.max_seq_len}")

    def _check_images(self, n: int, images) -> list[tuple[int, np.ndarray]]:
        if not images:
            return []
        size, hidden = self.image_chunk, self.c.hidden_size
        self.check_image_chunk()
        out, end = [], 0
        for k, (start, features) in enumerate(images):
            start = int(start)
            features = np.asarray(features, np.float32)
            if features.shape != (size, hidden):
                raise ValueError(f"image {k}: features {features.shape} must be ({size}, {hidden})")
            if start < end or start + size > n:
                raise ValueError(
                    f"image {k}: tokens [{start}, {start + size}) overlap the previous image or leave "
                    f"the prompt of {n} tokens"
                )
            out.append((start, features))
            end = start + size
        return out

    def _chunks(self, n: int, images):
        """(start, valid tokens, rows, image features or None) of every prefill chunk, in order:
        text chunks of ``prefill_chunk_size`` between the images, one chunk per image."""
        chunk, pos = self.rbln.prefill_chunk_size, 0
        for start, features in [*images, (n, None)]:
            for s in range(pos, start, chunk):
                yield s, min(chunk, start - s), chunk, None
            if features is not None:
                yield start, len(features), len(features), features
                pos = start + len(features)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """One token per sequence of the first B batch rows (B = len(tokens): the compiled
        ``batch_size`` or one of ``decoder_batch_sizes``, the decoder compiled for B rows, which
        reads the caches of those rows); return logits (B, V)."""
        if self.host_decode is not None and len(tokens) == self.rbln.batch_size:
            return self.host_decode(tokens)  # host_step: the same numbers and reports, fewer host calls
        c = self.c
        n = len(tokens)
        if n not in (self.rbln.decoder_batch_sizes or [self.rbln.batch_size]):
            raise ValueError(
                f"decode of {n} rows: the decoders are compiled for {self.rbln.decoder_batch_sizes} rows"
            )
        pos = self.positions[:n].copy()
        if (pos >= self.max_seq_len).any():
            raise ValueError(f"a sequence reached max_seq_len {self.max_seq_len}")
        x = self._embed("decode", np.asarray(tokens))
        if self.lora:
            self.lora.select(slice(0, n))
        attend = self._decode_attention(n, pos)
        for i in range(c.num_hidden_layers):
            x = self._layer("decode", i, x, pos, attend)
        self.positions[:n] += 1
        return self._logits("decode", x)

    def decode_top(self, tokens: np.ndarray, steps: int = 1) -> np.ndarray:
        """``decode``'s step, returning the argmax ids of its logits (B,) instead of them: the
        same emulated step and reports, bit for bit ``np.argmax(decode(tokens), -1)``. ``steps``:
        the greedy steps the caller expects, this one included; when they repay it, the host
        path computes only the argmax (``npu_kernels.lm_head.ArgmaxScreen``, made once)."""
        if self.host_decode is not None and len(tokens) == self.rbln.batch_size:
            return self.host_decode(tokens, top=True, steps=steps)
        return np.argmax(self.decode(tokens), axis=-1)

    def _decode_attention(self, n: int, pos: np.ndarray):
        """The ``attend(i, q, k, v)`` of a decode step of the first ``n`` sequences at positions
        ``pos``: the step's keys and values into the cache, then the attention kernel over it."""
        c = self.c

        def attend(i, q, k, v):
            k_cache, v_cache = (self._rows(t, n) for t in self.caches[i])
            self._write_cache("decode", i, 0, k[:, None], v[:, None], pos[:, None], (k_cache, v_cache))
            slots = k_cache.shape[2]
            reach = int(min(pos.max() + 1, slots))
            length = self._decode_length(i, reach, slots)
            mask = self.decode_mask(i, pos, length, slots)
            kernel, consts = self._decode_kernel(i)
            out = self._run("decode", kernel, q, k_cache, v_cache, mask, scale=c.attention_scale, **consts)
            return out.reshape(q.shape[0], -1)

        return attend

    def decode_mask(self, i: int, pos: np.ndarray, length: int, slots: int) -> np.ndarray:
        """The additive mask (B, length) of layer ``i``'s decode attention over the first
        ``length`` of its ``slots`` cache slots, for sequences at positions ``pos`` (B,)."""
        j = np.arange(length)[None, :]
        if self.ring(i):
            # Ring slot j holds position p = pos - ((pos - j) mod slots): valid once written,
            # visible within the window (slots past the window hold older positions).
            held = pos[:, None] - ((pos[:, None] - j) % slots)
            visible = (held >= 0) & (held > pos[:, None] - self.window)
        else:  # slot = position; a sliding layer still sees only the window
            visible = j <= pos[:, None]
            if self.c.is_sliding(i):
                visible &= j > pos[:, None] - self.window
        return np.where(visible, 0.0, -np.inf).astype(np.float32)

    def _rows(self, cache: DeviceTensor, n: int) -> DeviceTensor:
        """The first ``n`` sequences of a cache (B, Hkv, S, hd): a view of the same DRAM (rows
        are contiguous), as a decoder compiled for n rows addresses it."""
        if n == cache.shape[0]:
            return cache
        b = cache.buffer
        shape = (n, *b.shape[1:])
        view = Buffer(
            f"{b.name}[:{n}]", DRAM, shape, b.dtype, b.address, b.nbytes // b.shape[0] * n, data=b.data[:n]
        )
        return DeviceTensor(self.npu, view)

    def plan_all(self) -> None:
        """Compile: plan every kernel at the model's static shapes and check each fits SRAM.

        One dry prefill chunk and one decode step plan the kernels at their first shapes;
        the attention kernels are also planned at their largest (the last prefill chunk
        against a full global cache, decode over the whole cache). Plans for the shapes in
        between are made when first used and saved with the model."""
        decoders = self.rbln.decoder_batch_sizes or []  # none: compiled without the decode phase
        steps = [lambda: self.prefill(0, np.zeros(1, np.int64))]
        steps += [lambda b=b: self.decode(np.zeros(b, np.int64)) for b in decoders]
        steps += [self.reset, self._plan_largest_attention]
        for step in progress(steps, "compiling"):
            step()

    def _plan_largest_attention(self) -> None:
        chunk = self.rbln.prefill_chunk_size
        self._plan_prefill_attention(chunk, (self.max_seq_len - 1) // chunk * chunk)
        for b, i in ((b, i) for b in self.rbln.decoder_batch_sizes or [] for i in self._one_layer_per_type()):
            slots = self.caches[i][0].shape[2]
            self._plan_decode_attention(b, i, math.ceil(slots / self.kv_tile) * self.kv_tile)

    def _plan_decode_attention(self, b: int, i: int, length: int) -> None:
        """Plan layer i's decode attention for the decoder of ``b`` rows reading ``length`` slots."""
        c = self.c
        shape, dtype = self.caches[i][0].shape, self.caches[i][0].dtype
        cache = ((b, *shape[1:]), dtype)
        kernel, consts = self._decode_kernel(i)
        signature = [
            ((b, c.num_attention_heads, c.head_dim), dtype),
            cache,
            cache,
            ((b, length), self.npu.dtype),  # the mask as decode uploads it (floats: the device dtype)
        ]
        self._plan(kernel, signature, dict(scale=c.attention_scale, **consts))

    def plan_every_shape(self) -> None:
        """Plan every shape a text run can reach, so a saved model traces nothing when it runs
        (``plan_all`` plans the first and the largest; the default model's compile adds this):
        the prefill attention at each chunk's start, the cache writes of a last chunk of each
        length, and the decode attention at each length it reads (whole KV tiles or
        partitions), per decoder batch size and layer type."""
        c, chunk = self.c, self.rbln.prefill_chunk_size
        for q_start in range(0, self.max_seq_len, chunk):
            self._plan_prefill_attention(chunk, q_start)
        for i in self._one_layer_per_type():
            cache = (self.caches[i][0].shape, self.caches[i][0].dtype)
            for valid in range(1, chunk + 1):
                new = ((1, valid, c.num_key_value_heads, c.head_dim), cache[1])
                self._plan(kv_cache_write, [cache, new, ((1, valid, c.num_key_value_heads), "int32")], {})
        for b in self.rbln.decoder_batch_sizes or []:
            for i in self._one_layer_per_type():
                slots = self.caches[i][0].shape[2]
                for length in sorted({self._decode_length(i, r, slots) for r in range(1, slots + 1)}):
                    self._plan_decode_attention(b, i, length)

    def _one_layer_per_type(self) -> list[int]:
        return sorted({self.c.layer_types.index(t) for t in set(self.c.layer_types)})

    def _plan_prefill_attention(self, size: int, q_start: int, image_blocks=()) -> None:
        """Plan the prefill attention of a ``size``-token chunk at ``q_start`` on each layer type
        (the consts exactly as ``prefill`` passes them, so the plan is found at run time)."""
        c = self.c
        hq, hkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        for i in self._one_layer_per_type():
            k_cache = self.caches[i][0]
            cache = (k_cache.shape, k_cache.dtype)
            consts = self._prefill_consts(i, q_start, 0, image_blocks)
            new = ((size, hkv, hd), k_cache.dtype)
            self._plan(attention_prefill, [((size, hq, hd), k_cache.dtype), new, new, cache, cache], consts)

    def _plan(self, kernel, signature, consts):
        try:
            self.npu.plan(kernel, signature, consts)
        except Exception as e:
            shapes = ", ".join(f"{tuple(s)} {d}" for s, d in signature)
            raise type(e)(f"kernel {kernel.name} at ({shapes}) with {consts}: {e}") from None

    def plan_images(self) -> None:
        """Compile the image chunk: one dry image prefill at position 0 plans its kernels, and
        the attention is also planned at its largest (the last image that fits max_seq_len)."""
        self.check_image_chunk()
        size, c = self.image_chunk, self.c
        features = np.zeros((size, c.hidden_size), np.float32)
        self.prefill(0, np.zeros(size, np.int64), images=[(0, features)])
        self.reset()
        last = self.max_seq_len - size
        self._plan_prefill_attention(size, last, image_blocks=((last, last + size),))

    def reports(self) -> dict[str, CycleReport | None]:
        return {phase: cost.total(phase) for phase, cost in self.cost.items()}

    # ------------------------------------------------------------------ flash attention
    # attn_impl="flash_attn" (Optimum RBLN's FlashAttentionOp; sliding layers stay eager there
    # too): a global layer's decode attention reads its cache in whole partitions of
    # kvcache_partition_len positions, only those up to the furthest position of the batch,
    # and reduces over them (npu_kernels/attention_decode_flash.py). Eager decode reads whole
    # KV tiles up to that position (attention_decode). Prefill is the same kernel for both.

    def _flash_partition(self) -> int | None:
        """kvcache_partition_len under flash_attn (None: eager), checked against the chip."""
        impl, part, _ = self.rbln.attention(self.max_seq_len)
        if impl != "flash_attn":
            return None
        if part % self.kv_tile:
            raise ValueError(
                f"kvcache_partition_len {part} is not a multiple of the decode KV tile of "
                f"{self.npu.config.name} ({self.kv_tile} positions): a partition holds whole KV tiles"
            )
        return part

    def _decode_length(self, i: int, reach: int, slots: int) -> int:
        """Cache slots layer i's decode attention reads when the batch reaches ``reach``
        positions: whole partitions (flash_attn, global layers) or whole KV tiles."""
        if self.partition is not None and not self.c.is_sliding(i):
            return flash_decode_length(reach, self.partition, slots)
        return min(slots, math.ceil(reach / self.kv_tile) * self.kv_tile)

    def _decode_kernel(self, i: int):
        """(kernel, extra consts) of layer i's decode attention."""
        if self.partition is not None and not self.c.is_sliding(i):
            return attention_decode_flash, {"partition": self.partition}
        return attention_decode, {}


__all__ = ["Gemma3OnNPU", "PhaseCost", "IMAGE_PREFILL", "FULL", "SLIDING"]
