"""The kernel author's API, and the instruction stream it records.

A kernel is a Python function ``emit(k, *inputs, **consts)`` that receives a ``KernelContext``
``k`` and the input tensors (``Buffer`` objects in DRAM). It allocates SRAM, issues DMA
descriptors and compute instructions, and returns the output buffers it made with
``k.output``. Every call records one instruction:

    k.dma(dst, src, queue=q)                      # DMA queue q
    k.matmul(acc, a, b, accumulate=True)          # matrix unit of the operands' engine
    k.vector("mul", dst, a, b)                    # vector unit
    k.reduce("sum", dst, src)                     # vector unit, over the last axis
    k.activation("exp", dst, src, scale, bias)    # special-function unit

and returns its id. An instruction depends on every earlier instruction whose region of a
buffer it overlaps (read after write, write after read, write after write) and on any ids
passed in ``after=`` (explicit semaphores). Nothing else orders instructions on different
units, which is what lets a double-buffered kernel overlap DMA with compute.

When the context executes (``tile`` mode), each instruction also computes its values at once,
in program order, with every check: SRAM contents start as NaN and reading an element that no
instruction wrote raises. When it only traces (building the cached schedule of ``fast``
mode), the same checks on shapes, bounds, dtypes and capacity apply, but no values move; with
``verify`` (what ``NPU`` passes) it also tracks which regions instructions wrote, so that a
read of SRAM or DRAM scratch that no earlier instruction wrote, and an output left partly
unwritten, raise the same errors as in ``tile`` mode, once per traced shape. The regions are
known without values, except the rows of an indirect DMA: a gather's table rows are not
checked, and a scatter counts as writing its whole table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import dma as dma_mod
from . import units
from .config import NPUConfig
from .errors import (
    DTypeMismatchError,
    KernelError,
    OperandShapeError,
    OutOfBoundsError,
    UninitializedReadError,
)
from .memory import (
    DRAM,
    DTYPES,
    HOST,
    LOCAL,
    SHARED,
    Allocator,
    Buffer,
    View,
    check_dtype,
    store_value,
)

ENGINE_UNITS = ("matrix", "vector", "sfu")


@dataclass
class InstructionStream:
    """A recorded program: parallel arrays the scheduler reads, plus names for reports."""

    n_units: int
    first_dma_unit: int
    unit_names: list[str]
    unit: np.ndarray  # int64 (n,)
    is_dma: np.ndarray  # bool (n,)
    dur: np.ndarray  # float64: compute cycles, or DMA latency
    hide: np.ndarray  # float64: cycles skipped when issued back to back on its unit
    nbytes: np.ndarray  # float64: bytes a DMA moves (0 for compute)
    res: np.ndarray  # int64: shared resources a DMA touches (dma.RES_*)
    dep_ptr: np.ndarray  # int64 (n + 1,): deps of i are dep_idx[dep_ptr[i]:dep_ptr[i + 1]]
    dep_idx: np.ndarray  # int64
    ops: list[str]
    labels: list[str]
    flops: int = 0
    bytes_by_path: dict[str, int] = field(default_factory=dict)

    def __len__(self):
        return len(self.ops)


def _as_view(x) -> View:
    if isinstance(x, Buffer):
        return x.view()
    if isinstance(x, View):
        return x
    raise TypeError(f"expected a Buffer or View, got {type(x).__name__}")


class KernelContext:
    """What a kernel sees: the chip's config, allocation, and the instructions it may issue."""

    def __init__(
        self,
        name: str,
        config: NPUConfig,
        *,
        execute: bool,
        numerics: str = "bf16",
        dtype: str = "bf16",
        dram: Allocator | None = None,
        verify: bool = False,
    ):
        self.name = name
        self.config = config
        self.execute = execute
        # Which elements were written, by region: always when executing, on request in a trace.
        self.track = execute or verify
        self.numerics = numerics
        self.dtype = check_dtype(dtype)  # device dtype of activations and weights
        self.engines = range(config.num_engines)
        self._dram = dram or Allocator(DRAM, config.dram_bytes, config.dram_alignment, "DRAM")
        self._local = [
            Allocator(LOCAL, config.local_sram_bytes, config.sram_alignment, f"local SRAM of engine {e}")
            for e in self.engines
        ]
        self._shared = Allocator(SHARED, config.shared_sram_bytes, config.sram_alignment, "shared SRAM")
        self._retired: dict[int, list] = {}  # id(allocator) -> [(address, size, {unit: id})]
        self._buffers: list[Buffer] = []  # SRAM and DRAM scratch made by this kernel
        self.outputs: list[Buffer] = []
        self.first_dma_unit = len(ENGINE_UNITS) * config.num_engines
        self.n_units = self.first_dma_unit + config.dma_queues
        # Instruction stream, appended to by _record.
        self._unit: list[int] = []
        self._dur: list[float] = []
        self._hide: list[float] = []
        self._nbytes: list[int] = []
        self._res: list[int] = []
        self._deps: list[list[int]] = []
        self._ops: list[str] = []
        self._labels: list[str] = []
        self.flops = 0
        self.bytes_by_path: dict[str, int] = {}
        self._unordered: set[int] = set()  # ids of unordered scatters
        self.roofline_bytes: int | None = None  # set_roofline_bytes
        # Where this context's units start in the stream it records into (0 alone; device d of
        # a group records into device 0's lists from d * n_units, see share_stream).
        self.unit_base = 0

    def share_stream(self, owner: KernelContext, unit_base: int) -> None:
        """Record into ``owner``'s instruction lists, this context's units numbered from
        ``unit_base``: several devices' programs on one timeline (npu_emulator/group.py).
        Instruction ids are then global, so buffers of different devices order by them."""
        self.unit_base = unit_base
        for name in ("_unit", "_dur", "_hide", "_nbytes", "_res", "_deps", "_ops", "_labels"):
            setattr(self, name, getattr(owner, name))

    # ----------------------------------------------------------------- memory

    def alloc(
        self,
        shape,
        dtype: str | None = None,
        *,
        engine: int = 0,
        shared: bool = False,
        name: str | None = None,
    ) -> Buffer:
        """Allocate an SRAM buffer: local SRAM of ``engine``, or the shared SRAM."""
        dtype = check_dtype(dtype or self.dtype)
        shape = tuple(int(s) for s in shape)
        name = name or f"buf{len(self._buffers)}"
        if shared:
            allocator, memory, engine = self._shared, SHARED, None
        else:
            if engine not in self.engines:
                raise KernelError(
                    f"alloc {name!r}: engine {engine} does not exist ({len(self.engines)} engines)"
                )
            allocator, memory = self._local[engine], LOCAL
        address, size = allocator.allocate(name, shape, dtype)
        buf = Buffer(name, memory, shape, dtype, address, size, engine=engine)
        self._inherit(allocator, buf)
        if self.execute:
            buf.data = np.full(shape, np.nan if dtype != "int32" else -1, dtype=DTYPES[dtype][1])
        if self.track:
            buf.written = np.zeros(shape, np.bool_)
        self._buffers.append(buf)
        return buf

    def free(self, buf: Buffer) -> None:
        """Release an SRAM buffer; its space may be reused once its last access finished."""
        if buf.freed:
            raise KernelError(f"free {buf.name!r}: already freed")
        if buf.memory not in (LOCAL, SHARED):
            raise KernelError(f"free {buf.name!r}: only SRAM buffers are freed by kernels")
        allocator = self._shared if buf.memory == SHARED else self._local[buf.engine]
        last = dict(buf.inherited)
        for i, u in buf.reads.entries() + buf.writes.entries():
            last[u] = max(last.get(u, -1), i)
        self._retired.setdefault(id(allocator), []).append((buf.address, buf.nbytes, last))
        allocator.release(buf.address, buf.nbytes)
        buf.freed = True

    def _inherit(self, allocator: Allocator, buf: Buffer) -> None:
        """A new buffer over reused addresses waits for the last accesses to the old one."""
        kept = []
        lo, hi = buf.address, buf.address + buf.nbytes
        for address, size, last in self._retired.get(id(allocator), []):
            if address < hi and lo < address + size:
                for u, i in last.items():
                    buf.inherited[u] = max(buf.inherited.get(u, -1), i)
                if lo <= address and address + size <= hi:
                    continue  # the new buffer's record will carry these deps
            kept.append((address, size, last))
        self._retired[id(allocator)] = kept

    def output(self, shape, dtype: str | None = None, *, name: str = "out") -> Buffer:
        """Allocate an output tensor in DRAM; return it from ``emit``."""
        buf = self.dram(shape, dtype, name=name)
        self.outputs.append(buf)
        return buf

    def host(self, shape, dtype: str | None = None, *, name: str = "host") -> Buffer:
        """A buffer in host memory, reached by DMA over the host link (to and from DRAM)."""
        dtype = check_dtype(dtype or self.dtype)
        shape = tuple(int(s) for s in shape)
        buf = Buffer(name, HOST, shape, dtype, 0, math.prod(shape) * DTYPES[dtype][0])
        if self.execute:
            buf.data = np.zeros(shape, dtype=DTYPES[dtype][1])
        if self.track:
            buf.written = np.ones(shape, np.bool_)
        return buf

    def dram(self, shape, dtype: str | None = None, *, name: str = "scratch") -> Buffer:
        """Allocate a DRAM tensor (scratch space, or an output via ``output``)."""
        dtype = check_dtype(dtype or self.dtype)
        shape = tuple(int(s) for s in shape)
        address, size = self._dram.allocate(name, shape, dtype)
        buf = Buffer(name, DRAM, shape, dtype, address, size)
        if self.execute:
            buf.data = np.full(shape, np.nan if dtype != "int32" else -1, dtype=DTYPES[dtype][1])
        if self.track:
            buf.written = np.zeros(shape, np.bool_)
        self._buffers.append(buf)
        return buf

    def release_all(self) -> None:
        """Return the kernel's DRAM allocations (SRAM allocators die with the context)."""
        for buf in self._buffers:
            if buf.memory == DRAM and not buf.freed:
                self._dram.release(buf.address, buf.nbytes)
                buf.freed = True

    @property
    def peak_local(self) -> list[int]:
        return [a.peak for a in self._local]

    @property
    def peak_shared(self) -> int:
        return self._shared.peak

    def set_roofline_bytes(self, nbytes: int) -> None:
        """Declare the DRAM bytes the op cannot avoid, for the report's roofline, when that is
        not the size of its inputs and outputs (a decode step reads only L of S cache slots;
        an in-place cache write touches a few rows of a large tensor)."""
        if nbytes < 0:
            raise KernelError(f"set_roofline_bytes: {nbytes} is negative")
        self.roofline_bytes = int(nbytes)

    # ----------------------------------------------------------- instructions

    def dma(self, dst, src, *, queue: int = 0, after=()) -> int:
        """Copy region ``src`` to region ``dst`` (same shape and dtype) on DMA queue ``queue``."""
        dst, src = _as_view(dst), _as_view(src)
        iid = len(self._ops)
        label = f"dma #{iid} {src.name} -> {dst.name}"
        if not 0 <= queue < self.config.dma_queues:
            raise KernelError(f"{label}: queue {queue} does not exist ({self.config.dma_queues} queues)")
        latency, nbytes, res = dma_mod.check_dma(self.config, label, dst, src)
        path = f"{src.buffer.memory}->{dst.buffer.memory}"
        self.bytes_by_path[path] = self.bytes_by_path.get(path, 0) + nbytes
        if self.track:
            self._check_read(label, src)
            if self.execute:
                dst.array()[...] = store_value(src.array(), dst.dtype, self.numerics)
            self._mark(dst)
        return self._record(
            self.first_dma_unit + queue, "dma", label, latency, nbytes, res, [src], [dst], after
        )

    def matmul(self, dst, a, b, *, accumulate: bool = False, after=()) -> int:
        """``dst (M, N) = a (M, K) @ b (K, N)`` in fp32, or ``+=`` with ``accumulate``."""
        dst, a, b = _as_view(dst), _as_view(a), _as_view(b)
        iid = len(self._ops)
        label = f"matmul #{iid} {a.name} @ {b.name} -> {dst.name}"
        engine = self._engine(label, dst, a, b)
        cycles, flops = units.check_matmul(self.config, label, dst, a, b)
        self.flops += flops
        reads = [a, b] + ([dst] if accumulate else [])
        if self.track:
            for v in reads:
                self._check_read(label, v)
        if self.execute:
            acc = dst.array() if accumulate else None
            self._write(dst, units.do_matmul(a.array(), b.array(), acc))
        elif self.track:
            self._mark(dst)
        return self._record(
            3 * engine, "matmul", label, cycles, 0, 0, reads, [dst], after, hide=self.config.mac_fill_drain
        )

    def vector(self, op: str, dst, a, b=None, *, after=()) -> int:
        """Elementwise ``dst = op(a, b)`` on the vector unit; ``b`` a view that broadcasts
        over ``a`` (same shape, or 1 along an axis) or a Python scalar."""
        dst, a = _as_view(dst), _as_view(a)
        b_view = None if b is None or units._is_scalar(b) else _as_view(b)
        iid = len(self._ops)
        label = f"vector.{op} #{iid} -> {dst.name}"
        engine = self._engine(label, dst, a, *([b_view] if b_view is not None else []))
        cycles = units.check_vector(self.config, label, op, dst, a, b_view if b_view is not None else b)
        reads = [a] + ([b_view] if b_view is not None else [])
        if self.track:
            for v in reads:
                self._check_read(label, v)
        if self.execute:
            bval = b_view.array() if b_view is not None else b
            self._write(dst, units.do_vector(op, a.array(), bval))
        elif self.track:
            self._mark(dst)
        return self._record(3 * engine + 1, f"vector.{op}", label, cycles, 0, 0, reads, [dst], after)

    def reduce(self, op: str, dst, src, *, after=()) -> int:
        """Reduce ``src`` over its last axis into ``dst`` (same shape with last axis 1)."""
        dst, src = _as_view(dst), _as_view(src)
        iid = len(self._ops)
        label = f"reduce.{op} #{iid} {src.name} -> {dst.name}"
        engine = self._engine(label, dst, src)
        cycles = units.check_reduce(self.config, label, op, dst, src)
        if self.track:
            self._check_read(label, src)
        if self.execute:
            self._write(dst, units.do_reduce(op, src.array()))
        elif self.track:
            self._mark(dst)
        return self._record(3 * engine + 1, f"reduce.{op}", label, cycles, 0, 0, [src], [dst], after)

    def select(
        self, dst, src, *, offset: int, row_coef: int, col_coef: int, fill: float = float("-inf"), after=()
    ) -> int:
        """Masking on the vector unit (an affine select): ``dst[..., i, j] = src[..., i, j]``
        where ``offset + row_coef * i + col_coef * j >= 0``, else ``fill``. With i a query row
        and j a key column, one select draws a causal or sliding-window edge."""
        dst, src = _as_view(dst), _as_view(src)
        iid = len(self._ops)
        label = f"vector.select #{iid} {src.name} -> {dst.name}"
        engine = self._engine(label, dst, src)
        cycles = units.check_select(self.config, label, dst, src)
        if self.track:
            self._check_read(label, src)
        if self.execute:
            self._write(dst, units.do_select(src.array(), offset, row_coef, col_coef, fill))
        elif self.track:
            self._mark(dst)
        return self._record(3 * engine + 1, "vector.select", label, cycles, 0, 0, [src], [dst], after)

    def gather(self, dst, table, indices, *, queue: int = 0, after=()) -> int:
        """Indirect DMA: ``dst[r] = table[indices[r]]`` for each row r. ``table`` (V, D) in
        DRAM, ``indices`` (n,) int32 in local SRAM (the DMA engine reads them there), ``dst``
        (n, D) in SRAM. Costs like a descriptor moving n rows."""
        dst, table, indices = _as_view(dst), _as_view(table), _as_view(indices)
        iid = len(self._ops)
        label = f"gather #{iid} {table.name}[{indices.name}] -> {dst.name}"
        self._check_indirect(label, queue, table, indices, dst)
        latency, res, nbytes = self._transfer(label, table, dst)
        if self.track:
            self._check_read(label, indices)
        if not self.execute:
            if self.track:
                self._mark(dst)  # which table rows it reads is data: checked in tile mode
        else:
            idx = self._checked_indices(label, indices, table)
            unwritten = ~table.written_mask()[idx]
            if unwritten.any():
                r, c = (int(v) for v in np.argwhere(unwritten)[0])
                raise UninitializedReadError(
                    f"{label} reads row {int(idx[r])} of {table.name!r} ({table.buffer.where}) at column {c}, "
                    "which no instruction has written"
                )
            rows_read = table.array()[idx]
            dst.array()[...] = store_value(rows_read, dst.dtype, self.numerics)
            self._mark(dst)
        return self._record(
            self.first_dma_unit + queue, "gather", label, latency, nbytes, res, [indices, table], [dst], after
        )

    def scatter(self, table, indices, src, *, queue: int = 0, unordered: bool = False, after=()) -> int:
        """Indirect DMA: ``table[indices[r]] = src[r]`` for each row r (e.g. new keys into
        a KV cache at data-dependent slots). ``table`` (V, D) in DRAM, ``indices`` (n,) int32 in
        local SRAM, ``src`` (n, D) in SRAM. Rows are written in order (a repeated index keeps
        the last).

        The rows are data, so the scatter counts as a write of the whole table and orders
        against every other access to it. ``unordered=True`` is the kernel's promise that
        concurrent unordered scatters into this table hit disjoint rows: they then order only
        against plain reads and writes, and may run on several queues at once."""
        table, indices, src = _as_view(table), _as_view(indices), _as_view(src)
        iid = len(self._ops)
        label = f"scatter #{iid} {src.name} -> {table.name}[{indices.name}]"
        self._check_indirect(label, queue, table, indices, src)
        latency, res, nbytes = self._transfer(label, src, table, nbytes=src.nbytes)
        if self.track:
            self._check_read(label, indices)
            self._check_read(label, src)
        if not self.execute:
            if self.track:
                self._mark(table)  # the rows it writes are data: count the whole table
        else:
            idx = self._checked_indices(label, indices, table)
            tab, mask = table.array(), table.written_mask()
            vals = store_value(src.array(), table.dtype, self.numerics)
            for r, i in enumerate(idx):
                tab[i] = vals[r]
                mask[i] = True
        return self._record(
            self.first_dma_unit + queue,
            "scatter",
            label,
            latency,
            nbytes,
            res,
            [indices, src],
            [table],
            after,
            unordered=unordered,
        )

    def _transfer(self, label, src, dst, nbytes=None):
        """Route an indirect transfer and count its bytes (those of its rows, ``dst`` unless
        given); return (latency, resource flags, bytes)."""
        latency, res = dma_mod.route(self.config, label, src.buffer.memory, dst.buffer.memory)
        nbytes = dst.nbytes if nbytes is None else nbytes
        path = f"{src.buffer.memory}->{dst.buffer.memory}"
        self.bytes_by_path[path] = self.bytes_by_path.get(path, 0) + nbytes
        return latency, res, nbytes

    def _check_indirect(self, label, queue, table, indices, rows):
        if not 0 <= queue < self.config.dma_queues:
            raise KernelError(f"{label}: queue {queue} does not exist ({self.config.dma_queues} queues)")
        if table.buffer.memory != DRAM or len(table.shape) != 2:
            raise KernelError(
                f"{label}: the table must be a 2-D DRAM region, got {table.shape} in {table.buffer.where}"
            )
        if indices.dtype != "int32" or len(indices.shape) != 1 or indices.buffer.memory != LOCAL:
            raise DTypeMismatchError(
                f"{label}: indices must be a 1-D int32 region of local SRAM, got {indices.shape} "
                f"{indices.dtype} in {indices.buffer.where}"
            )
        if rows.shape != (indices.shape[0], table.shape[1]):
            raise OperandShapeError(
                f"{label}: rows {rows.shape} must be (indices {indices.shape[0]}, table width {table.shape[1]})"
            )
        if rows.dtype != table.dtype:
            raise DTypeMismatchError(
                f"{label}: table {table.name!r} is {table.dtype}, rows {rows.name!r} are {rows.dtype}"
            )

    def _checked_indices(self, label, indices, table):
        idx = indices.array()
        bad = (idx < 0) | (idx >= table.shape[0])
        if bad.any():
            r = int(np.argmax(bad))
            raise OutOfBoundsError(
                f"{label}: index {int(idx[r])} at row {r} is outside table {table.name!r} of {table.shape[0]} rows"
            )
        return idx

    def activation(self, func: str, dst, src, *, scale: float = 1.0, bias=None, after=()) -> int:
        """``dst = func(src * scale + bias)`` on the special-function unit; ``bias`` a scalar
        or a view that broadcasts (e.g. one value per row)."""
        dst, src = _as_view(dst), _as_view(src)
        bias_view = None if bias is None or units._is_scalar(bias) else _as_view(bias)
        iid = len(self._ops)
        label = f"activation.{func} #{iid} {src.name} -> {dst.name}"
        engine = self._engine(label, dst, src, *([bias_view] if bias_view is not None else []))
        cycles = units.check_activation(
            self.config, label, func, dst, src, bias_view if bias_view is not None else bias
        )
        reads = [src] + ([bias_view] if bias_view is not None else [])
        if self.track:
            for v in reads:
                self._check_read(label, v)
        if self.execute:
            bval = bias_view.array() if bias_view is not None else bias
            self._write(dst, units.do_activation(func, src.array(), scale, bval))
        elif self.track:
            self._mark(dst)
        return self._record(3 * engine + 2, f"activation.{func}", label, cycles, 0, 0, reads, [dst], after)

    # --------------------------------------------------------------- internals

    def _engine(self, label: str, *views: View) -> int:
        engines = set()
        for v in views:
            if v.buffer.memory != LOCAL:
                raise KernelError(
                    f"{label}: operand {v.name!r} is in {v.buffer.where}; compute units read and "
                    "write only their engine's local SRAM (move it there by DMA)"
                )
            engines.add(v.buffer.engine)
        if len(engines) != 1:
            names = {v.name: v.buffer.engine for v in views}
            raise KernelError(f"{label}: operands live on different engines {names}")
        return engines.pop()

    def _check_read(self, label: str, view: View) -> None:
        if view.buffer.written is None:
            return  # an input (the host wrote it), or in a trace a buffer already written whole
        mask = view.written_mask()
        if not mask.all():
            where = tuple(int(i) for i in np.argwhere(~mask)[0])
            raise UninitializedReadError(
                f"{label} reads {view.name!r} ({view.buffer.where}) at index {where} of its "
                f"region {view.shape} (offset {view.offset}), which no instruction has written"
            )

    def _write(self, dst: View, values: np.ndarray) -> None:
        dst.array()[...] = store_value(values, dst.dtype, self.numerics)
        self._mark(dst)

    def _mark(self, dst: View) -> None:
        buf = dst.buffer
        if buf.written is None:
            return
        if not self.execute and _whole(dst):
            # A trace holds no values: a buffer written whole needs no mask any more (None, as
            # for the inputs), which makes every later read and write of it free to check.
            buf.written = None
        else:
            dst.written_mask()[...] = True

    def _record(
        self, unit, op, label, dur, nbytes, res, reads, writes, after, hide=0, unordered=False
    ) -> int:
        iid = len(self._ops)
        local_unit, unit = unit, self.unit_base + unit  # the stream's unit, local to this context
        deps: set[int] = set(int(a) for a in after)
        for a in after:
            if not 0 <= int(a) < iid:
                raise KernelError(f"{label}: after={int(a)} is not an earlier instruction id")
        tracked = [(v, False) for v in reads] + [(v, True) for v in writes]
        extents = []
        for v, is_write in tracked:
            buf = v.buffer
            if buf.freed:
                raise KernelError(f"{label}: {buf.name!r} was freed")
            ext = v.extent()
            extents.append(ext)
            writers = buf.writes.overlapping(ext)
            if is_write and unordered:
                writers = [i for i in writers if i not in self._unordered]
            deps.update(writers)
            if is_write:
                deps.update(buf.reads.overlapping(ext))
            deps.update(buf.inherited.values())
        # Keep, per unit, only the latest dependency. A compute unit runs one instruction at a
        # time, so deps on its own earlier instructions are implied; a DMA queue overlaps its
        # descriptors' latencies, so there they are kept (a gather waits for its indices).
        latest: dict[int, int] = {}
        for d in deps:
            u = self._unit[d]
            if (u != unit or local_unit >= self.first_dma_unit) and d > latest.get(u, -1):
                latest[u] = d
        for (v, is_write), ext in zip(tracked, extents):
            buf = v.buffer
            if is_write and unordered:
                buf.writes.add(ext, iid, unit)  # waits for no other unordered write: prunes nothing
                self._unordered.add(iid)
            elif is_write:
                # Later accesses that overlap a pruned entry overlap this write, which
                # already waits for it.
                buf.writes.prune(ext)
                buf.reads.prune(ext)
                buf.writes.add(ext, iid, unit)
            else:
                buf.reads.prune(ext, unit)  # same unit, in order: the newer read suffices
                buf.reads.add(ext, iid, unit)
        self._unit.append(unit)
        self._dur.append(float(dur))
        self._hide.append(float(hide))
        self._nbytes.append(nbytes)
        self._res.append(res)
        self._deps.append(sorted(latest.values()))
        self._ops.append(op)
        self._labels.append(label)
        return iid

    def check_outputs_written(self) -> None:
        for buf in self.outputs:
            if buf.written is not None and not buf.written.all():
                where = tuple(int(i) for i in np.argwhere(~buf.written)[0])
                raise KernelError(
                    f"kernel {self.name!r} left output {buf.name!r} {buf.shape} unwritten, "
                    f"first at index {where}"
                )

    def stream(self) -> InstructionStream:
        n = len(self._ops)
        counts = np.fromiter((len(d) for d in self._deps), np.int64, n)
        dep_ptr = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=dep_ptr[1:])
        dep_idx = np.fromiter((d for ds in self._deps for d in ds), np.int64, int(dep_ptr[-1]))
        names = [f"engine{e}.{u}" for e in self.engines for u in ENGINE_UNITS]
        names += [f"dma.q{q}" for q in range(self.config.dma_queues)]
        return InstructionStream(
            n_units=self.n_units,
            first_dma_unit=self.first_dma_unit,
            unit_names=names,
            unit=np.array(self._unit, np.int64),
            is_dma=np.array([u >= self.first_dma_unit for u in self._unit], np.bool_),
            dur=np.array(self._dur, np.float64),
            hide=np.array(self._hide, np.float64),
            nbytes=np.array(self._nbytes, np.float64),
            res=np.array(self._res, np.int64),
            dep_ptr=dep_ptr,
            dep_idx=dep_idx,
            ops=list(self._ops),
            labels=list(self._labels),
            flops=self.flops,
            bytes_by_path=dict(self.bytes_by_path),
        )


def _whole(view: View) -> bool:
    """Whether ``view`` is every element of its buffer (a full slice, or a dense region)."""
    buf = view.buffer
    if view.axes is not None:
        return not view.fixed and view.shape == buf.shape
    dense, acc = [], 1
    for n in reversed(view.shape):
        dense.append(acc)
        acc *= n
    return view.offset == 0 and view.size == buf.size and view.strides == tuple(reversed(dense))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def tiles(total: int, size: int):
    """Yield ``(start, length)`` of consecutive tiles of ``size`` covering ``total``."""
    for s in range(0, total, size):
        yield s, min(size, total - s)


__all__ = ["KernelContext", "InstructionStream", "ceil_div", "tiles"]
