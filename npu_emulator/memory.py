"""Memories of the NPU: dtypes, buffers in DRAM and SRAM, strided views, the allocators.

Values are held in float32 (or int32) NumPy arrays whatever the declared dtype; the declared
dtype sets the byte width that timing and capacity use, and in ``bf16`` numerics every value
written into a ``bf16`` buffer is rounded to bfloat16 (round to nearest even).
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from .errors import AllocationError, OutOfBoundsError

# Declared dtype -> (bytes per element, NumPy dtype that holds the values).
DTYPES: dict[str, tuple[int, type]] = {
    "bf16": (2, np.float32),
    "fp32": (4, np.float32),
    "int32": (4, np.int32),
}

# What a compact host copy of a bf16 tensor holds (NPU.to_device(..., compact=True)).
BF16 = np.dtype(ml_dtypes.bfloat16)

# Memory levels, in the order reports list them.
DRAM, SHARED, LOCAL, HOST = "dram", "shared", "local", "host"


def itemsize(dtype: str) -> int:
    return DTYPES[check_dtype(dtype)][0]


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; the NPU has {sorted(DTYPES)}")
    return dtype


PARALLEL_ROUNDING = 1 << 15  # values from which round_bf16 rounds on Numba's threads


def round_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest bfloat16 (ties to even), returned as float32."""
    x = np.asarray(x, dtype=np.float32)
    if x.size >= PARALLEL_ROUNDING and x.flags.c_contiguous:  # the same values (npu_emulator/bf16.py)
        from .bf16 import round_array

        return round_array(x)
    return x.astype(ml_dtypes.bfloat16).astype(np.float32)


def store_value(values: np.ndarray, dtype: str, numerics: str) -> np.ndarray:
    """What a buffer of ``dtype`` holds after ``values`` are written to it."""
    if dtype == "bf16" and numerics == "bf16":
        return round_bf16(values)
    return np.asarray(values, dtype=DTYPES[dtype][1])


def as_stored(values, numerics: str, dtype: str = "bf16") -> np.ndarray:
    """``values`` as an SRAM tile of ``dtype`` holds them under ``numerics`` (bf16 numerics round
    a bf16 tile's values to bfloat16; fp32 numerics keep fp32). A numerics-aware ``fast``
    function applies it where its tiled program passes an intermediate through such a tile,
    so that fast and tile mode agree under both numerics."""
    if numerics not in ("bf16", "fp32"):
        raise ValueError(f"numerics must be 'bf16' or 'fp32', got {numerics!r}")
    return store_value(np.asarray(values, np.float32), check_dtype(dtype), numerics)


class Buffer:
    """A tensor placed in one memory: DRAM, an engine's local SRAM or the shared SRAM.

    ``data`` is None when the kernel is only being traced (fast mode builds its schedule
    without numbers). ``written`` marks the elements some instruction has written (tile mode).
    """

    def __init__(self, name, memory, shape, dtype, address, nbytes, engine=None, data=None):
        self.name = name
        self.memory = memory
        self.engine = engine
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self.address = address
        self.nbytes = nbytes
        self.size = math.prod(self.shape)
        self.data = data
        self.written = None
        self.freed = False
        # Dependency tracking (program.py): recent accesses as (extent, instruction id).
        self.reads = AccessLog()
        self.writes = AccessLog()
        self.inherited: dict[int, int] = {}

    @property
    def where(self) -> str:
        if self.memory == LOCAL:
            return f"local SRAM of engine {self.engine}"
        return {DRAM: "DRAM", SHARED: "shared SRAM", HOST: "host memory"}[self.memory]

    def view(self) -> View:
        strides, acc = [], 1
        for s in reversed(self.shape):
            strides.append(acc)
            acc *= s
        axes = tuple((i, 0, 1) for i in range(len(self.shape)))
        return View(self, 0, self.shape, tuple(reversed(strides)), axes, {})

    def __getitem__(self, index) -> View:
        return self.view()[index]

    def region(self, offset: int, shape, strides) -> View:
        return self.view().region(offset, shape, strides)

    def reshape(self, *shape) -> View:
        return self.view().reshape(*shape)

    def __repr__(self):
        return f"Buffer({self.name!r}, {self.where}, shape={self.shape}, dtype={self.dtype})"


class View:
    """A strided region of a buffer: ``offset`` and ``strides`` count elements.

    Views come from slicing a buffer (``buf[0:64, 128:256]``, steps allowed, never clipped:
    a slice past the end raises) or from an explicit descriptor ``buf.region(offset, shape,
    strides)``. ``axes`` maps each view axis to (buffer axis, start, step) for slice views, so
    that dependency tracking can tell disjoint tiles of one buffer apart.
    """

    __slots__ = ("buffer", "offset", "shape", "strides", "axes", "fixed")

    def __init__(self, buffer, offset, shape, strides, axes, fixed):
        self.buffer = buffer
        self.offset = int(offset)
        self.shape = tuple(int(s) for s in shape)
        self.strides = tuple(int(s) for s in strides)
        self.axes = axes  # None for explicit regions
        self.fixed = fixed  # buffer axis -> index, for axes an integer index removed
        check_region(self)

    @property
    def dtype(self) -> str:
        return self.buffer.dtype

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * itemsize(self.buffer.dtype)

    @property
    def name(self) -> str:
        return self.buffer.name

    def region(self, offset: int, shape, strides) -> View:
        """An explicit descriptor relative to this view's first element (element units)."""
        shape, strides = tuple(shape), tuple(strides)
        if len(shape) != len(strides):
            raise OutOfBoundsError(
                f"region of {self.name!r}: shape {shape} and strides {strides} differ in rank"
            )
        return View(self.buffer, self.offset + offset, shape, strides, None, {})

    def reshape(self, *shape) -> View:
        """The same elements in row-major order as ``shape`` (one entry may be -1), without a
        copy: axes split or merge where the strides allow, as NumPy's view reshape. Raises
        ``OutOfBoundsError`` when the elements are not laid out for it. The result is an
        explicit region (dependency tracking sees its element interval)."""
        shape = tuple(
            int(s) for s in (shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape)
        )
        if shape.count(-1) == 1 and all(s > 0 or s == -1 for s in shape):
            known = math.prod(s for s in shape if s != -1)
            if known and self.size % known == 0:
                shape = tuple(self.size // known if s == -1 else s for s in shape)
        if any(s < 0 for s in shape) or math.prod(shape) != self.size:
            raise OutOfBoundsError(
                f"reshape of {self.name!r}: view {self.shape} ({self.size} elements) cannot become {shape}"
            )
        probe = np.lib.stride_tricks.as_strided(np.empty(1, np.uint8), self.shape, self.strides)
        try:
            strides = np.reshape(probe, shape, copy=False).strides
        except ValueError:
            raise OutOfBoundsError(
                f"reshape of {self.name!r}: view {self.shape} with strides {self.strides} cannot become "
                f"{shape} without a copy (its elements are not laid out in that order)"
            ) from None
        return View(self.buffer, self.offset, shape, strides, None, {})

    def __getitem__(self, index) -> View:
        if not isinstance(index, tuple):
            index = (index,)
        if len(index) > len(self.shape):
            raise OutOfBoundsError(
                f"{self.name!r}: {len(index)} indices for a view of rank {len(self.shape)}"
            )
        index = index + (slice(None),) * (len(self.shape) - len(index))
        offset, shape, strides = self.offset, [], []
        axes = [] if self.axes is not None else None
        fixed = dict(self.fixed)
        for dim, (ix, n, st) in enumerate(zip(index, self.shape, self.strides)):
            if isinstance(ix, slice):
                step = 1 if ix.step is None else ix.step
                if step <= 0:
                    raise OutOfBoundsError(f"{self.name!r}: slice step must be positive, got {step}")
                start = 0 if ix.start is None else ix.start
                stop = n if ix.stop is None else ix.stop
                start = start + n if start < 0 else start
                stop = stop + n if stop < 0 else stop
                if not 0 <= start <= n or not start <= stop <= n:
                    raise OutOfBoundsError(
                        f"{self.name!r}: slice {start}:{stop} out of bounds for axis {dim} "
                        f"of size {n} (view shape {self.shape})"
                    )
                count = (stop - start + step - 1) // step
                offset += start * st
                shape.append(count)
                strides.append(st * step)
                if axes is not None:
                    b_axis, b_start, b_step = self.axes[dim]
                    axes.append((b_axis, b_start + start * b_step, b_step * step))
            else:
                i = int(ix)
                i = i + n if i < 0 else i
                if not 0 <= i < n:
                    raise OutOfBoundsError(
                        f"{self.name!r}: index {int(ix)} out of bounds for axis {dim} of size {n} "
                        f"(view shape {self.shape})"
                    )
                offset += i * st
                if axes is not None:
                    b_axis, b_start, b_step = self.axes[dim]
                    fixed[b_axis] = b_start + i * b_step
        return View(self.buffer, offset, shape, strides, None if axes is None else tuple(axes), fixed)

    def extent(self):
        """What this view touches, for dependency tracking: a box over the buffer's axes
        (slice views) or a linear element interval (explicit regions)."""
        if self.size == 0:
            return ("empty",)
        lo = self.offset
        hi = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.strides)) + 1
        if self.axes is None:
            return ("linear", lo, hi, hi - lo == self.size)
        box = [(0, n) for n in self.buffer.shape]
        for b_axis, i in self.fixed.items():
            box[b_axis] = (i, i + 1)
        for (b_axis, start, step), n in zip(self.axes, self.shape):
            box[b_axis] = (start, start + (n - 1) * step + 1)
        return ("box", lo, hi, tuple(box))

    def array(self) -> np.ndarray:
        """The NumPy view of the values (tile mode only)."""
        return _strided(self.buffer.data, self)

    def written_mask(self) -> np.ndarray:
        return _strided(self.buffer.written, self)

    def __repr__(self):
        return f"View({self.name!r}, offset={self.offset}, shape={self.shape}, strides={self.strides})"


def _strided(flat_source: np.ndarray, view: View) -> np.ndarray:
    flat = flat_source.reshape(-1)
    item = flat.itemsize
    return np.lib.stride_tricks.as_strided(
        flat[view.offset :] if view.size else flat[:0],
        shape=view.shape,
        strides=tuple(s * item for s in view.strides),
    )


def check_region(view: View) -> None:
    buf = view.buffer
    if any(n < 0 for n in view.shape) or any(s < 0 for s in view.strides):
        raise OutOfBoundsError(
            f"region of {buf.name!r} ({buf.where}): negative shape or stride: shape {view.shape}, "
            f"strides {view.strides}"
        )
    if view.size == 0:
        return
    last = view.offset + sum((n - 1) * s for n, s in zip(view.shape, view.strides))
    if view.offset < 0 or last >= buf.size:
        raise OutOfBoundsError(
            f"region out of bounds of {buf.name!r} ({buf.where}, shape {buf.shape}, "
            f"{buf.size} elements): shape {view.shape}, offset {view.offset}, strides "
            f"{view.strides} reach elements {view.offset}..{last}"
        )


def extents_overlap(a, b) -> bool:
    if a[0] == "empty" or b[0] == "empty":
        return False
    if a[0] == "box" and b[0] == "box":
        return all(lo1 < hi2 and lo2 < hi1 for (lo1, hi1), (lo2, hi2) in zip(a[3], b[3]))
    return a[1] < b[2] and b[1] < a[2]


def extent_covers(a, b) -> bool:
    """Whether extent ``a`` contains all of ``b`` (conservative: False when unsure)."""
    if b[0] == "empty":
        return True
    if a[0] == "empty":
        return False
    if a[0] == "box" and b[0] == "box":
        return all(lo1 <= lo2 and hi2 <= hi1 for (lo1, hi1), (lo2, hi2) in zip(a[3], b[3]))
    # A linear extent covers only where it is dense (touches every element of its interval).
    return a[0] == "linear" and a[3] and a[1] <= b[1] and b[2] <= a[2]


class Allocator:
    """First-fit allocator over one memory with capacity and alignment; tracks the peak."""

    def __init__(self, memory: str, capacity: int, alignment: int, label: str):
        self.memory = memory
        self.capacity = capacity
        self.alignment = alignment
        self.label = label
        self.free_blocks: list[list[int]] = [[0, capacity]]  # sorted [start, size]
        self.used = 0
        self.peak = 0

    def allocate(self, name: str, shape, dtype: str) -> tuple[int, int]:
        nbytes = math.prod(shape) * itemsize(dtype)
        size = max(self.alignment, -(-nbytes // self.alignment) * self.alignment)
        for block in self.free_blocks:
            if block[1] >= size:
                address = block[0]
                block[0] += size
                block[1] -= size
                if block[1] == 0:
                    self.free_blocks.remove(block)
                self.used += size
                self.peak = max(self.peak, self.used)
                return address, size
        largest = max((b[1] for b in self.free_blocks), default=0)
        raise AllocationError(
            f"cannot allocate {name!r} {tuple(shape)} {dtype} in {self.label}: asked {size} B, "
            f"{self.capacity - self.used} B free of {self.capacity} B capacity "
            f"(largest free block {largest} B)"
        )

    def release(self, address: int, size: int) -> None:
        self.used -= size
        blocks = self.free_blocks
        blocks.append([address, size])
        blocks.sort()
        merged = [blocks[0]]
        for start, sz in blocks[1:]:
            last = merged[-1]
            if last[0] + last[1] == start:
                last[1] += sz
            else:
                merged.append([start, sz])
        self.free_blocks = merged


class AccessLog:
    """Recent accesses to one buffer as (extent, instruction id, unit), for dependency tracking.

    Queries ask which accesses overlap an extent; a long log (a weight read tile by tile, an
    output written tile by tile) is kept in NumPy arrays so a query stays one vectorised pass,
    with the newest CHUNK entries in a Python list.
    """

    CHUNK = 64

    def __init__(self):
        self.tail: list = []
        self.n_frozen = 0
        self.lo = self.hi = self.isbox = self.blo = self.bhi = self.iid = self.unit = self.alive = None

    def __len__(self):
        return len(self.tail) + (int(self.alive.sum()) if self.n_frozen else 0)

    def entries(self):
        """(iid, unit) of every live entry."""
        out = [(i, u) for _, i, u in self.tail]
        if self.n_frozen:
            out += list(zip(self.iid[self.alive].tolist(), self.unit[self.alive].tolist()))
        return out

    def overlapping(self, ext) -> list[int]:
        if ext[0] == "empty":
            return []
        hits = [i for e, i, _ in self.tail if extents_overlap(e, ext)]
        if self.n_frozen:
            hits += self.iid[self._overlap_mask(ext)].tolist()
        return hits

    def add(self, ext, iid: int, unit: int) -> None:
        if ext[0] == "empty":
            return
        self.tail.append((ext, iid, unit))
        if len(self.tail) >= self.CHUNK:
            self._freeze()

    def prune(self, ext, unit: int | None = None) -> None:
        """Drop entries that ``ext`` covers (only those of ``unit`` when given)."""
        if ext[0] == "empty":
            return
        self.tail = [
            (e, i, u) for e, i, u in self.tail if not ((unit is None or u == unit) and extent_covers(ext, e))
        ]
        if self.n_frozen:
            covered = self._cover_mask(ext)
            if unit is not None:
                covered &= self.unit == unit
            self.alive &= ~covered

    def _freeze(self):
        exts = [e for e, _, _ in self.tail]
        rank = next((len(e[3]) for e in exts if e[0] == "box"), 1)
        lo = np.array([e[1] for e in exts], np.int64)
        hi = np.array([e[2] for e in exts], np.int64)
        isbox = np.array([e[0] == "box" for e in exts], np.bool_)
        blo = np.zeros((len(exts), rank), np.int64)
        bhi = np.zeros((len(exts), rank), np.int64)
        for j, e in enumerate(exts):
            if e[0] == "box":
                blo[j] = [a for a, _ in e[3]]
                bhi[j] = [b for _, b in e[3]]
        iid = np.array([i for _, i, _ in self.tail], np.int64)
        unit = np.array([u for _, _, u in self.tail], np.int64)
        alive = np.ones(len(exts), np.bool_)
        new = (lo, hi, isbox, blo, bhi, iid, unit, alive)
        if self.n_frozen:
            keep = self.alive
            old = (self.lo, self.hi, self.isbox, self.blo, self.bhi, self.iid, self.unit, self.alive)
            new = tuple(np.concatenate([o[keep], x]) for o, x in zip(old, new))
        self.lo, self.hi, self.isbox, self.blo, self.bhi, self.iid, self.unit, self.alive = new
        self.n_frozen = len(self.lo)
        self.tail = []

    def _overlap_mask(self, ext):
        lin = (self.lo < ext[2]) & (ext[1] < self.hi)
        if ext[0] == "box":
            elo = np.array([a for a, _ in ext[3]], np.int64)
            ehi = np.array([b for _, b in ext[3]], np.int64)
            box = np.all((self.blo < ehi) & (elo < self.bhi), axis=1)
            lin = np.where(self.isbox, box, lin)
        return lin & self.alive

    def _cover_mask(self, ext):
        if ext[0] == "box":
            elo = np.array([a for a, _ in ext[3]], np.int64)
            ehi = np.array([b for _, b in ext[3]], np.int64)
            return self.isbox & np.all((elo <= self.blo) & (self.bhi <= ehi), axis=1)
        if ext[3]:  # dense linear interval: covers everything inside it
            return (ext[1] <= self.lo) & (self.hi <= ext[2])
        return np.zeros(self.n_frozen, np.bool_)
