"""Pieces shared by the kernels: splitting work over engines and queues, and the row streamer.

Most of Gemma3's non-matmul ops work row by row on a (rows, width) tensor: norms, softmax,
RoPE, elementwise gating. ``stream_rows`` writes the tiled program for all of them once:

* rows are split into equal blocks, one per engine;
* each engine streams its block in tiles of ``tr`` rows through ``depth`` SRAM slots (2 =
  double buffering: the load of tile i+1 and the store of tile i-1 overlap the compute on i),
  loads on one DMA queue and stores on another, so 8 engines x 2 queues can saturate DRAM;
* the caller's ``body`` emits the compute of one tile on its engine;
* engines' programs are interleaved tile by tile in program order (queues serve in order).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from npu_emulator import KernelError
from npu_emulator.memory import itemsize
from npu_emulator.program import tiles


def chunks(total: int, parts: int) -> list[tuple[int, int]]:
    """``total`` elements in ``parts`` near-equal (start, length) chunks in order, the first
    ``total % parts`` one longer; some empty when ``total < parts``."""
    base, extra = divmod(total, parts)
    out, start = [], 0
    for p in range(parts):
        n = base + (p < extra)
        out.append((start, n))
        start += n
    return out


def split(total: int, parts: int) -> list[tuple[int, int]]:
    """``total`` items in at most ``parts`` near-equal (start, length) blocks, none empty."""
    return chunks(total, max(1, min(parts, total)))


def queues(cfg, engine: int) -> tuple[int, int]:
    """The two DMA queues an engine uses (loads, stores) when every engine streams at once."""
    per = max(1, cfg.dma_queues // cfg.num_engines)
    first = engine * per % cfg.dma_queues
    return first, (first + per - 1) % cfg.dma_queues


def rows_view(buf, width: int | None = None):
    """A DRAM tensor of any rank as a 2-D (rows, last dim) view, or (rows, width) if given."""
    width = width or buf.shape[-1]
    rows = buf.size // width
    if rows * width != buf.size:
        raise KernelError(f"{buf.name!r} of shape {buf.shape} is not a whole number of rows of {width}")
    if len(buf.shape) == 2 and buf.shape[1] == width:
        return buf.view()  # a slice view: tiles of it are told apart by dependency tracking
    return buf.region(0, (rows, width), (width, 1))


@dataclass(frozen=True)
class Operand:
    """One DRAM tensor the streamer moves, as (rows, width), per tile of rows.

    ``per_row`` False means the same (1, width) row for every tile (a weight vector): loaded
    once per engine instead of per tile."""

    view: object  # emulator View, (rows, width) or (1, width)
    per_row: bool = True


def row_tile(cfg, width_bytes_per_row: int, scratch_elems_per_row: int, depth: int, rows: int) -> int:
    """Rows per tile: what fits the vector unit's operand limit and the local SRAM budget."""
    widest = max(1, scratch_elems_per_row)
    by_vector = max(1, cfg.vector_max_elements // widest)
    per_row_bytes = depth * width_bytes_per_row + 4 * scratch_elems_per_row
    by_sram = (cfg.local_sram_bytes // 2) // max(1, per_row_bytes)
    if by_sram < 1:
        raise KernelError(
            f"one row needs {per_row_bytes} B of local SRAM with {depth} buffers; an engine has "
            f"{cfg.local_sram_bytes} B"
        )
    return max(1, min(by_vector, by_sram, rows))


def stream_rows(
    k,
    inputs: list[Operand],
    outputs: list,
    body: Callable,
    *,
    scratch: dict[str, tuple[int, str]] | None = None,
    depth: int = 2,
    tile_rows: int | None = None,
    setup: Callable | None = None,
):
    """Stream (rows, width) operands through every engine; see the module docstring.

    inputs: Operands (DRAM views). outputs: DRAM views of shape (rows, width_j).
    body(k, engine, ins, outs, scratch, consts) emits the compute of one tile; ``ins`` and
        ``outs`` are SRAM views of the tile's rows (per-row operands) or the (1, width) row,
        ``scratch`` maps names to fp32 (or given dtype) SRAM views (tile_rows, width) for
        temporaries, ``consts`` is what ``setup`` returned for this engine.
    setup(k, engine, ins_once) -> consts: emits once-per-engine work (e.g. ``1 + w``) given
        the SRAM copies of the non-per-row operands.
    """
    cfg = k.config
    rows = next(op.view.shape[0] for op in inputs if op.per_row)
    scratch = scratch or {}
    in_row_bytes = sum(op.view.shape[1] * itemsize(op.view.dtype) for op in inputs if op.per_row)
    out_row_bytes = sum(o.shape[1] * itemsize(o.dtype) for o in outputs)
    scratch_elems = sum(w for w, _ in scratch.values())
    widest = max(
        [op.view.shape[1] for op in inputs] + [o.shape[1] for o in outputs] + [w for w, _ in scratch.values()]
    )
    per_engine = split(rows, cfg.num_engines)[0][1]
    # At least ~4 tiles per engine, so loads, compute and stores pipeline.
    tr = tile_rows or row_tile(
        cfg, in_row_bytes + out_row_bytes, max(scratch_elems, widest), depth, -(-per_engine // 4)
    )
    if tr * widest > cfg.vector_max_elements:
        raise KernelError(
            f"rows of width {widest} exceed the vector unit's {cfg.vector_max_elements} elements per "
            "instruction; this op needs a column-chunked kernel"
        )
    programs = []
    for e, (r0, rl) in enumerate(split(rows, cfg.num_engines)):
        programs.append(_engine_rows(k, e, r0, rl, tr, inputs, outputs, body, scratch, depth, setup))
    interleave(programs)


def _engine_rows(k, e, r0, rl, tr, inputs, outputs, body, scratch, depth, setup):
    q_in, q_out = queues(k.config, e)
    once = []
    for j, op in enumerate(inputs):
        if not op.per_row:
            t = k.alloc(op.view.shape, op.view.dtype, engine=e, name=f"w{j}_e{e}")
            k.dma(t, op.view, queue=q_in)
            once.append(t)
    consts = setup(k, e, once) if setup else once
    in_slots = [
        [
            k.alloc((tr, op.view.shape[1]), op.view.dtype, engine=e, name=f"in{j}_{s}_e{e}")
            for s in range(depth)
        ]
        if op.per_row
        else None
        for j, op in enumerate(inputs)
    ]
    out_slots = [
        [k.alloc((tr, o.shape[1]), o.dtype, engine=e, name=f"out{j}_{s}_e{e}") for s in range(depth)]
        for j, o in enumerate(outputs)
    ]
    scr = {name: k.alloc((tr, w), dt, engine=e, name=f"{name}_e{e}") for name, (w, dt) in scratch.items()}
    once_iter = iter(once)
    fixed = [None if op.per_row else next(once_iter) for op in inputs]
    for i, (t0, tl) in enumerate(tiles(rl, tr)):
        s = i % depth
        rows = slice(r0 + t0, r0 + t0 + tl)
        ins = []
        for j, op in enumerate(inputs):
            if op.per_row:
                t = in_slots[j][s][:tl]
                k.dma(t, op.view[rows], queue=q_in)
                ins.append(t)
            else:
                ins.append(fixed[j])
        outs = [out_slots[j][s][:tl] for j in range(len(outputs))]
        body(k, e, ins, outs, {n: v[:tl] for n, v in scr.items()}, consts)
        for j, o in enumerate(outputs):
            k.dma(o[rows], outs[j], queue=q_out)
        yield


def interleave(programs) -> None:
    """Run engines' programs (generators issuing instructions) step by step, round robin, until
    all are done: program order is issue order per queue, so the engines work in step."""
    programs = list(programs)
    while programs:
        programs = [p for p in programs if next(p, StopIteration) is not StopIteration]


def load_store_queues(cfg, engine: int) -> tuple[list[int], list[int]]:
    """An engine's share of the DMA queues, split into the ones it loads on and the ones it
    stores on (the same ones when it has a single queue)."""
    lo, hi = queues(cfg, engine)
    own = list(range(lo, hi + 1))
    half = max(1, len(own) // 2)
    return own[:half], (own[half:] or own)


def index_queue(cfg, gather_qs: list[int], other_qs: list[int]) -> int:
    """A queue to load gather indices on that is not one of the gather queues: a gather waits
    for its indices, and a queue serves its descriptors in order."""
    free = [q for q in other_qs if q not in gather_qs]
    return free[0] if free else (gather_qs[-1] + 1) % cfg.dma_queues


def trace_cycles(cfg, name: str, emit, inputs, *args, dtype: str = "bf16", **consts) -> float:
    """Cycles of ``emit(ctx, *shells, *args, **consts)`` traced without values and scheduled:
    what an autotuner compares candidates by. ``inputs`` lists (name, shape, dtype) of the DRAM
    inputs."""
    from npu_emulator.memory import DRAM, Buffer
    from npu_emulator.program import KernelContext
    from npu_emulator.timing import schedule

    ctx = KernelContext(f"{name}-trial", cfg, execute=False, dtype=dtype)
    shells = [Buffer(n, DRAM, shape, dt, 0, 0) for n, shape, dt in inputs]
    emit(ctx, *shells, *args, **consts)
    return schedule(ctx.stream(), cfg).total


def fastest(candidates, cycles_of):
    """The candidate with the fewest cycles (the first on ties)."""
    best = None
    for c in candidates:
        cycles = cycles_of(c)
        if best is None or cycles < best[0]:
            best = (cycles, c)
    return best[1]
