"""Host shortcuts of the model's steps: fewer host computations, the same emulated cycles.

* **Valid prefill rows.** The chip runs a prefill chunk at its compiled, padded size
  (``prefill_chunk_size`` rows, the last chunk padded); the host needs only the valid rows. In
  fast mode the last chunk's kernels therefore run their ``fast`` functions on the valid rows
  while the cycle report is the plan of the padded chunk, exactly what the per-kernel path adds:
  the same plan, looked up by the padded input shapes and the same consts. Padding rows never
  reach a valid row's result (attention is causal within a text chunk and image chunks are
  never padded), and every host product computes each output row on its own in a fixed order
  (``npu_kernels/hostmath.py``), so the valid rows' values are those of the padded run, bit
  for bit. Tile mode always runs the padded chunk: it executes the chip's program as is.
* **Decode steps without the per-kernel run path** (``HostDecode``): one jitted pass per
  decoder layer (``gemma3/host_fused.py``: the kernels' fast functions' numbers, rounded and
  summed as they are), the reports of the per-kernel path's step at the same attention lengths
  added; tokens, logits and reports bit for bit those of the per-kernel path.

The model's hooks (``gemma3/runtime.py``): ``Gemma3OnNPU.valid_rows_only`` (class switch),
``padded_rows`` (set while a chunk runs its valid rows) and ``host_decode`` (None: per kernel).
"""

from __future__ import annotations

import numba
import numpy as np

from npu_emulator import CycleReport, Kernel, KernelError
from npu_emulator.device import DeviceTensor
from npu_emulator.memory import DTYPES, round_bf16, store_value
from npu_kernels.embedding import embedding
from npu_kernels.hostmath import _held
from npu_kernels.lm_head import ArgmaxScreen, lm_head
from npu_kernels.norms import rmsnorm

from .host_fused import decode_layer

# Which inputs of each kernel the prefill chunk's rows run along (their first axis); every
# other input (weights, tables, caches) has the same shape padded or not.
CHUNK_ROW_INPUTS = {
    "embedding": (0,),  # ids (T,)
    "rmsnorm": (0,),  # x (T, hidden) or (T, heads, head_dim)
    "matmul": (0,),  # a (T, K)
    "rope": (0, 3),  # x (T, heads, head_dim), positions (T,)
    "attention_prefill": (0, 1, 2),  # q (T, Hq, hd), k and v (T, Hkv, hd)
    "geglu_mlp": (0,),  # x (T, hidden)
}


# Greedy steps a generate must expect before its host decode makes the LM head's int8 screen
# (npu_kernels.lm_head.ArgmaxScreen): on Gemma 3 270M (2-core AMD EPYC) it takes 0.2-0.36 s, and
# a step then reads its 171 MB instead of 335 (~3.5 ms less): it repays itself after 60-100 steps.
SCREEN_AFTER = 64

# What decode_layer reads per layer (gemma3/host_fused.py), in its order.
NORMS = (
    "input_layernorm",
    "q_norm",
    "k_norm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)
PRODUCTS = ("qkv", "o", "gate", "up", "down")


def run_valid_rows(
    npu, kernel: Kernel, inputs, consts: dict, padded_rows: int
) -> tuple[np.ndarray, CycleReport]:
    """Run ``kernel``'s fast function on ``inputs`` whose chunk rows (``CHUNK_ROW_INPUTS``)
    are the valid rows only, and cost it as the chunk of ``padded_rows`` rows the chip runs.

    Returns (outputs, report) as ``NPU.run`` does: outputs rounded to their declared dtype as
    fast mode stores them, with the valid rows only; the report is the padded chunk's plan."""
    if npu.mode != "fast":
        raise KernelError(f"{kernel.name}: valid rows only are a fast-mode shortcut (mode {npu.mode!r})")
    if kernel.name not in CHUNK_ROW_INPUTS:
        raise NotImplementedError(f"running only the valid rows of kernel {kernel.name!r}")
    rows = CHUNK_ROW_INPUTS[kernel.name]
    # Host arrays go to DRAM as NPU.run takes them (rounded to the device dtype), then freed.
    names = kernel.input_names(len(inputs))
    tensors = [x if isinstance(x, DeviceTensor) else npu.to_device(x, name=n) for x, n in zip(inputs, names)]
    try:
        return _run(npu, kernel, tensors, rows, consts, padded_rows)
    finally:
        for x, t in zip(inputs, tensors):
            if t is not x:
                npu.free(t)


def _run(npu, kernel, tensors, rows, consts, padded_rows):
    arrays = [t.numpy() for t in tensors]
    valid = arrays[rows[0]].shape[0]
    if valid > padded_rows or any(arrays[r].shape[0] != valid for r in rows):
        shapes = ", ".join(str(arrays[r].shape) for r in rows)
        raise KernelError(
            f"{kernel.name}: chunk-row inputs {shapes} must all have <= {padded_rows} rows, equally"
        )
    signature = [
        (((padded_rows, *t.shape[1:]) if i in rows else tuple(t.shape)), t.dtype)
        for i, t in enumerate(tensors)
    ]
    plan = npu.plan(kernel, signature, consts)
    if kernel._fast_numerics:
        numerics = npu.numerics if npu.dtype == "bf16" else "fp32"
        results = kernel.fast(*arrays, numerics=numerics, **consts)
    else:
        results = kernel.fast(*arrays, **consts)
    results = list(results) if isinstance(results, (tuple, list)) else [results]
    outputs = []
    for r, (name, shape, dtype) in zip(results, plan.outputs):
        r = np.asarray(r)
        if r.shape != (valid, *shape[1:]):
            raise KernelError(
                f"kernel {kernel.name!r}: fast output {name!r} of {valid} valid rows has shape {r.shape}, "
                f"the padded chunk's is {shape}"
            )
        outputs.append(store_value(r, dtype, npu.numerics).astype(DTYPES[dtype][1], copy=False))
    return (outputs[0] if len(outputs) == 1 else tuple(outputs)), plan.report


class HostDecode:
    """The decode step without the emulator's per-kernel run path, the same numbers and cycles.

    ``NPU.run`` costs ~50 us of Python per kernel call (signature, plan lookup, DRAM copies of
    the inputs, output checks): about 13 ms of a 270M decode step's ~250 calls. The reports a
    step adds depend only on its static shapes, and those only on the attention lengths (whole
    KV tiles of each layer's cache), so the first step at each length runs the per-kernel path
    (``Gemma3OnNPU.decode``) and its reports are kept; later steps at that length run each
    layer as one jitted pass (``gemma3/host_fused.py``), rounding every kernel's inputs and
    outputs as the device stores them (bf16 numerics: to bfloat16), and add the kept reports.
    The tokens, logits and cycle reports are those of the per-kernel path, bit for bit."""

    def __init__(self, runtime):
        self.rt = runtime
        self.steps: dict[tuple, list[CycleReport]] = {}  # (batch shape, attention lengths) -> reports
        self._prepared = None  # per layer: what decode_layer reads of the weights (_layers)
        self._screen = None  # the LM head's argmax screen (``screen``)
        self.screen_after = SCREEN_AFTER

    def __call__(self, tokens: np.ndarray, top: bool = False, steps: int = 1) -> np.ndarray:
        """The step's logits (B, V), or with ``top`` their argmax ids (B,) (``decode_top``: the
        LM head's screen is made when ``steps``, the greedy steps the caller expects, this one
        included, reach ``screen_after``)."""
        rt = self.rt
        pos = rt.positions.copy()
        if (pos >= rt.max_seq_len).any():
            raise ValueError(f"a sequence reached max_seq_len {rt.max_seq_len}")
        lengths = tuple(self._length(i, pos) for i in range(rt.c.num_hidden_layers))
        key = (np.shape(tokens), lengths)  # the batch's rows too: every kernel's shape follows them
        kept = self.steps.get(key)
        cost = rt.cost["decode"]
        if top and self._screen is None and steps >= self.screen_after:
            self.screen()
        if kept is None:  # the per-kernel path, once per attention length: its reports are kept
            first = len(cost.reports)
            rt.host_decode = None
            try:
                logits = rt.decode(tokens)
            finally:
                rt.host_decode = self
            self.steps[key] = cost.reports[first:]
            return np.argmax(logits, axis=-1) if top else logits
        logits = self._step(np.asarray(tokens), pos, lengths, top)
        cost.reports.extend(kept)
        rt.npu.last_report = kept[-1]
        rt.positions += 1
        return logits

    def _length(self, i: int, pos: np.ndarray) -> int:
        """Cache slots the decode attention of layer ``i`` reads: whole KV tiles (as decode)."""
        rt = self.rt
        slots = rt.caches[i][0].shape[2]
        reach = int(min(pos.max() + 1, slots))
        return min(slots, -(-reach // rt.kv_tile) * rt.kv_tile)

    def _layers(self) -> list[tuple]:
        """Per layer, what ``decode_layer`` reads of the weights (gemma3/host_fused.py): the
        six norms' (1 + w) in fp32, as ``rmsnorm_fast`` computes them, and the five products'
        weights as (N, K) rows (views of the column-major host copies, bf16 bits or fp32).
        Made once: the compiled model's weights do not change."""
        if self._prepared is None:
            rt, c = self.rt, self.rt.c
            w = {name: t.numpy() for name, t in rt.weights.items()}
            width = max(c.hidden_size, c.head_dim)
            layers = []
            for i in range(c.num_hidden_layers):
                norms = np.zeros((len(NORMS), width), np.float32)
                for j, name in enumerate(NORMS):
                    g = w[f"{i}.{name}"]
                    norms[j, : g.shape[0]] = (1.0 + g.astype(np.float32)).astype(np.float32)
                products = tuple(_held(np.ascontiguousarray(w[f"{i}.{n}"].T)) for n in PRODUCTS)
                layers.append((norms, *products))
            self._prepared = layers
        return self._prepared

    def _step(self, tokens, pos, lengths, top=False):
        rt, c = self.rt, self.rt.c
        bf16 = rt.npu.numerics == "bf16" and rt.npu.dtype == "bf16"
        w = rt.weights

        def stored(x):  # what a bf16 DRAM tensor holds: kernel inputs copied in, and outputs
            return round_bf16(x) if bf16 else np.asarray(x, np.float32)

        eps = np.float32(c.rms_norm_eps)
        x = stored(embedding.fast(tokens.astype(np.int32), w["embed"].numpy(), scale=c.embed_scale))
        x = np.ascontiguousarray(x, np.float32)
        tables = {}  # layer type -> the cos and sin rows at each sequence's position
        masks = {}  # (ring, sliding, length) -> mask
        scale = np.float32(c.attention_scale)
        for i, prepared in enumerate(self._layers()):
            kind = c.layer_types[i]
            if kind not in tables:
                tables[kind] = tuple(
                    np.ascontiguousarray(w[f"{t}_{kind}"].numpy()[pos], np.float32) for t in ("cos", "sin")
                )
            k_cache, v_cache = (t.numpy() for t in rt.caches[i])
            slots = k_cache.shape[2]
            ring = rt.ring(i)
            key = (ring, c.is_sliding(i), lengths[i], slots)
            if key not in masks:
                masks[key] = np.ascontiguousarray(rt.decode_mask(i, pos, lengths[i], slots), np.float32)
            where = (pos % slots if ring else pos).astype(np.int64)
            decode_layer(
                x,
                *prepared,
                *tables[kind],
                k_cache,
                v_cache,
                where,
                masks[key],
                scale,
                eps,
                c.num_attention_heads,
                c.num_key_value_heads,
                c.head_dim,
                bf16,
                numba.get_num_threads(),
            )
        h = stored(rmsnorm.fast(stored(x), w["norm"].numpy(), eps=c.rms_norm_eps))
        if top and self._screen is not None:
            ids = self._screen(h, w["vocab_ids"].numpy())
            if ids is not None:
                return ids
        logits, _ = lm_head.fast(
            h, w["lm_head"].numpy(), w["vocab_ids"].numpy(), softcap=c.final_logit_softcapping
        )
        logits = np.asarray(logits, np.float32)  # the LM head's logits are fp32 on the device
        return np.argmax(logits, axis=-1) if top else logits

    def screen(self) -> ArgmaxScreen | None:
        """The LM head's int8 screen (``ArgmaxScreen``), made on first use; None under a final
        softcap (tanh can tie distinct logits: the argmax needs them all)."""
        if self._screen is None and self.rt.c.final_logit_softcapping is None:
            self._screen = ArgmaxScreen(self.rt.weights["lm_head"].numpy())
        return self._screen

    def streamed_bytes(self) -> int:
        """The bytes of weights a step reads: the five products of each layer, and the LM head
        (its int8 screen once a step used it)."""
        layers = sum(p.nbytes for prepared in self._layers() for p in prepared[1:])
        head = self._screen.nbytes if self._screen is not None else self.rt.weights["lm_head"].numpy().nbytes
        return layers + head
