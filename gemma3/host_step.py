"""Host shortcuts of the model's steps: fewer host computations, the same emulated cycles.

The chip runs a prefill chunk at its compiled, padded size (``prefill_chunk_size`` rows, the
last chunk padded); the host needs only the valid rows. In fast mode the last chunk's kernels
therefore run their ``fast`` functions on the valid rows while the cycle report is the plan of
the padded chunk, exactly what the per-kernel path adds: the same plan, looked up by the padded
input shapes and the same consts. Padding rows never reach a valid row's result (attention is
causal within a text chunk and image chunks are never padded), and every host product computes
each output row on its own in a fixed order (``npu_kernels/hostmath.py``), so the valid rows'
values are those of the padded run, bit for bit.

Tile mode always runs the padded chunk: it executes the chip's program as is.
"""

from __future__ import annotations

import numpy as np

from npu_emulator import CycleReport, Kernel, KernelError
from npu_emulator.device import DeviceTensor
from npu_emulator.memory import DTYPES, store_value

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
