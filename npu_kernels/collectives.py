"""Collectives over a device group (npu_emulator/group.py): all-reduce, all-gather, reduce-scatter.

IO: every device holds one DRAM tensor per input, in the device dtype; the collectives work on
its elements in row-major order (a flat vector of S elements, any shape).

Each takes ``algorithm="ring"`` (any topology) or ``"tree"`` (a switch: any device reaches any
other; on a ring it raises NotImplementedError).

* ``all_reduce(x)``: x of the same shape on every device -> the elementwise sum, same shape,
  on every device.
* ``reduce_scatter(x)``: x of the same shape on every device -> device d holds chunk d of the
  flattened sum, (l_d,), the chunks near-equal in device order (the first S % N one longer).
* ``all_gather(x)``: device d holds x_d of any shape -> every device holds the concatenation
  of the flattened x_0 ... x_{N-1}, (sum l_d,).

Ring (N devices, the flat tensor in N chunks): the reduce-scatter takes N - 1 steps; in step s
device e sends chunk (e - 1 - s) mod N to device e + 1, which adds its own copy of that chunk
to what it received; after the last step device d holds chunk d of the sum. The all-gather
takes N - 1 steps; in step s device e sends chunk (e - s) mod N to device e + 1, written in
place. The all-reduce is the two: 2 (N - 1) steps of S / N elements each, so on one link the
bytes are 2 (N - 1) / N * B for a tensor of B bytes, and the time

    2 (N - 1) * (link latency + (B / N) / link bandwidth) + (N - 1) * t_add(B / N)

when the sends do not wait for DRAM, where t_add is one chunk's reduction on the device (see
``ring_all_reduce_cycles``). Tree (all-reduce): partners 1, 2, 4, ... apart add the whole tensor
pairwise towards device 0 (ceil(log2 N) steps), then device 0's sum is broadcast back down the
same tree: 2 ceil(log2 N) steps of the whole B each; fewer latencies, more bytes: the better
for small tensors (a decode step's (batch, hidden) activations), the ring for large ones. The
tree's reduce-scatter sums on device 0 the same way, then sends each subtree its chunks down;
its all-gather sends each subtree's blocks up to device 0, then the whole down.

Each reduction streams a chunk through the engines' local SRAM in tiles of at most
``vector_max_elements`` (3 device-dtype tiles per slot, 2 slots per engine: the load of tile
i + 1 overlaps the add of tile i), tiles round robin over the engines, each engine on its own
queues. Sums round to the device dtype at every step, in the ring's (or the tree's) order;
the ``fast`` functions add in that order with the same rounding. FLOPs: none on the matrix
unit; (N - 1) * S additions on the vector units.
"""

from __future__ import annotations

import math

import numpy as np

from npu_emulator import GroupKernel, KernelError, as_stored
from npu_emulator.memory import itemsize

from .common import chunks, queues

ALGORITHMS = ("ring", "tree")


def _flat(buf):
    return buf.region(0, (buf.size,), (1,))


def _pieces(cfg, start: int, length: int):
    """(start, length) pieces of a flat region that one descriptor each moves."""
    for s in range(start, start + length, cfg.dma_max_elements):
        yield s, min(cfg.dma_max_elements, start + length - s)


def _send(k, dst_device, dst, dst_start, src, src_start, length, after=()):
    """Send ``length`` flat elements, in as many descriptors as the limit needs; returns the
    last one's id."""
    iid = None
    for s, n in _pieces(k.config, src_start, length):
        iid = k.send(
            dst_device,
            dst.region(dst_start + s - src_start, (n,), (1,)),
            src.region(s, (n,), (1,)),
            after=after,
        )
    return iid


def _down_the_tree(n, send):
    """``send(d, p, stride)`` down the tree, level by level from the farthest partner. A
    device's sends to its partners are in flight together: their latencies overlap, their bytes
    share its port."""
    for stride in reversed(_strides(n)):
        for d in range(0, n - stride, 2 * stride):
            send(d, d + stride, stride)


def _copy(k, dst, src, length):
    """A local DRAM -> DRAM copy of ``length`` flat elements on queue 0."""
    for s, n in _pieces(k.config, 0, length):
        k.dma(dst.region(s, (n,), (1,)), src.region(s, (n,), (1,)), queue=0)


def _tile(cfg, dtype) -> int:
    # 3 tiles (own, received, sum) x 2 slots must fit an engine's local SRAM.
    return max(1, min(cfg.vector_max_elements, cfg.local_sram_bytes // (6 * itemsize(dtype))))


class _Adder:
    """Device-local reductions ``out[o:o+n] = a[a0:a0+n] + b[b0:b0+n]`` on flat DRAM views,
    streamed through every engine's SRAM."""

    def __init__(self, k):
        self.k, cfg = k, k.config
        self.tile = _tile(cfg, k.dtype)
        self.slots = [
            [
                [k.alloc((self.tile,), engine=e, name=f"{nm}{e}.{s}") for nm in ("own", "recv", "sum")]
                for s in range(2)
            ]
            for e in k.engines
        ]
        self.step = 0

    def add(self, out, o, a, a0, b, b0, n):
        k = self.k
        for t0 in range(0, n, self.tile):
            tl = min(self.tile, n - t0)
            e = self.step % len(self.slots)
            own, recv, acc = self.slots[e][(self.step // len(self.slots)) % 2]
            load, store = queues(k.config, e)
            k.dma(own[:tl], a.region(a0 + t0, (tl,), (1,)), queue=load)
            k.dma(recv[:tl], b.region(b0 + t0, (tl,), (1,)), queue=load)
            k.vector("add", acc[:tl], own[:tl], recv[:tl])
            k.dma(out.region(o + t0, (tl,), (1,)), acc[:tl], queue=store)
            self.step += 1


def _check_same_shapes(name, xs):
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) != 1:
        raise KernelError(f"{name}: every device's x must have one shape, got {[tuple(x.shape) for x in xs]}")


def _ring_reduce_scatter(g, xs, scratch_out):
    """The ring's reduce-scatter phase; ``scratch_out(d)`` is where device d's reductions go
    (a flat view, indexed by chunk start) and where its later sends read from. Returns the
    chunks."""
    n = len(g)
    size = xs[0].size
    parts = chunks(size, n)
    longest = max(length for _, length in parts)
    recv = [[g[d].dram((longest,), name=f"recv{i}") for i in range(2)] for d in range(n)]
    adders = [_Adder(g[d]) for d in range(n)]
    flat = [_flat(x) for x in xs]
    for s in range(n - 1):
        for e in range(n):
            f = (e + 1) % n
            c = (e - 1 - s) % n
            start, length = parts[c]
            if not length:
                continue
            src, src0 = (flat[e], start) if s == 0 else scratch_out(e, c)
            _send(g[e], f, _flat(recv[f][s % 2]), 0, src, src0, length)
        for f in range(n):
            c = (f - 2 - s) % n
            start, length = parts[c]
            if not length:
                continue
            out, o = scratch_out(f, c)
            adders[f].add(out, o, flat[f], start, _flat(recv[f][s % 2]), 0, length)
    return parts


def all_reduce_emit(g, x, algorithm: str = "ring"):
    """Sum of ``x`` over the devices, on every device (see the module docstring)."""
    if algorithm not in ALGORITHMS:
        raise KernelError(f"all_reduce: algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    _check_same_shapes("all_reduce", x)
    n = len(g)
    outs = [g[d].output(x[d].shape, x[d].dtype, name="out") for d in range(n)]
    flat_out = [_flat(o) for o in outs]
    size = x[0].size
    if n == 1:
        _copy(g[0], flat_out[0], _flat(x[0]), size)
        return outs
    if algorithm == "tree":
        return _tree_all_reduce(g, x, outs)
    parts = chunks(size, n)
    _ring_reduce_scatter(g, x, lambda d, c: (flat_out[d], parts[c][0]))
    for s in range(n - 1):
        for e in range(n):
            c = (e - s) % n
            start, length = parts[c]
            if length:
                _send(g[e], (e + 1) % n, flat_out[(e + 1) % n], start, flat_out[e], start, length)
    return outs


def _need_switch(g, what):
    if g.link.topology != "switch":
        raise NotImplementedError(
            f"tree {what} on a {g.link.topology} ({g.link.name}): partners 2, 4, ... apart are no "
            "neighbours; use algorithm='ring'"
        )


def _strides(n: int) -> list[int]:
    """The tree's levels: partners 1, 2, 4, ... apart."""
    out, stride = [], 1
    while stride < n:
        out.append(stride)
        stride *= 2
    return out


def _tree_reduce(g, flat_x, flat_acc, size):
    """Pairwise sums up the tree: device d + stride sends its partial sum to device d, which
    adds it to its own; device 0's ``flat_acc`` ends with the whole sum."""
    n = len(g)
    recv = [g[d].dram((size,), name="recv") for d in range(n)]
    adders = [_Adder(g[d]) for d in range(n)]
    reduced = [False] * n  # whether device d's partial sum is in acc yet (else it is x)
    for stride in _strides(n):
        for d in range(0, n - stride, 2 * stride):
            p = d + stride
            _send(g[p], d, _flat(recv[d]), 0, flat_acc[p] if reduced[p] else flat_x[p], 0, size)
            own = flat_acc[d] if reduced[d] else flat_x[d]
            adders[d].add(flat_acc[d], 0, own, 0, _flat(recv[d]), 0, size)
            reduced[d] = True


def _tree_all_reduce(g, x, outs):
    _need_switch(g, "all-reduce")
    n, size = len(g), x[0].size
    flat_out = [_flat(o) for o in outs]
    _tree_reduce(g, [_flat(b) for b in x], flat_out, size)
    # device 0's sum back down the same tree
    _down_the_tree(n, lambda d, p, _: _send(g[d], p, flat_out[p], 0, flat_out[d], 0, size))
    return outs


def reduce_scatter_emit(g, x, algorithm: str = "ring"):
    """Chunk d of the flattened sum of ``x`` on device d (see the module docstring); the tree
    sums the whole tensor on device 0, then sends each subtree its chunks down the tree."""
    if algorithm not in ALGORITHMS:
        raise KernelError(f"reduce_scatter: algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    _check_same_shapes("reduce_scatter", x)
    n, size = len(g), x[0].size
    parts = chunks(size, n)
    if any(length == 0 for _, length in parts):
        raise NotImplementedError(
            f"reduce_scatter of {size} elements over {n} devices: a device would hold an empty chunk"
        )
    outs = [g[d].output((parts[d][1],), x[d].dtype, name="out") for d in range(n)]
    if n == 1:
        _copy(g[0], _flat(outs[0]), _flat(x[0]), size)
        return outs
    # Partial sums in DRAM scratch.
    acc = [_flat(g[d].dram((size,), name="partial")) for d in range(n)]
    if algorithm == "tree":
        _need_switch(g, "reduce-scatter")
        _tree_reduce(g, [_flat(b) for b in x], acc, size)

        def scatter(d, p, stride):
            last = min(p + stride, n) - 1  # the subtree of p holds devices p .. last
            lo, hi = parts[p][0], parts[last][0] + parts[last][1]
            _send(g[d], p, acc[p], lo, acc[d], lo, hi - lo)

        _down_the_tree(n, scatter)
        for d in range(n):
            start, length = parts[d]
            for s, m in _pieces(g.config, start, length):
                g[d].dma(_flat(outs[d]).region(s - start, (m,), (1,)), acc[d].region(s, (m,), (1,)), queue=0)
        return outs

    # Ring: the last step's sum (chunk d on device d) goes straight to the output.
    def target(d, c):
        if c == d:
            return _flat(outs[d]), 0
        return acc[d], parts[c][0]

    _ring_reduce_scatter(g, x, target)
    return outs


def all_gather_emit(g, x, algorithm: str = "ring"):
    """The flattened ``x`` of every device, concatenated in device order, on every device; the
    tree gathers the blocks up to device 0, then sends the whole down the tree."""
    if algorithm not in ALGORITHMS:
        raise KernelError(f"all_gather: algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    n = len(g)
    sizes = [b.size for b in x]
    total = sum(sizes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
    outs = [g[d].output((total,), x[d].dtype, name="out") for d in range(n)]
    flat_out = [_flat(o) for o in outs]
    for d in range(n):
        if sizes[d]:
            g[d].dma(flat_out[d].region(starts[d], (sizes[d],), (1,)), _flat(x[d]), queue=0)
    if algorithm == "tree" and n > 1:
        _need_switch(g, "all-gather")
        for stride in _strides(n):
            for d in range(0, n - stride, 2 * stride):
                p = d + stride
                if stride == 1:  # its own block: straight from x, not waiting for the copy
                    _send(g[p], d, flat_out[d], starts[p], _flat(x[p]), 0, sizes[p])
                    continue
                last = min(p + stride, n) - 1  # p holds the blocks of devices p .. last
                lo, hi = starts[p], starts[last] + sizes[last]
                _send(g[p], d, flat_out[d], lo, flat_out[p], lo, hi - lo)
        _down_the_tree(n, lambda d, p, _: _send(g[d], p, flat_out[p], 0, flat_out[d], 0, total))
        return outs
    for s in range(n - 1):
        for e in range(n):
            c = (e - s) % n
            if not sizes[c]:
                continue
            src, src0 = (_flat(x[e]), 0) if s == 0 else (flat_out[e], starts[c])
            _send(g[e], (e + 1) % n, flat_out[(e + 1) % n], starts[c], src, src0, sizes[c])
    return outs


# ------------------------------------------------------------------------- whole arrays


def all_reduce_reference(x, algorithm: str = "ring"):
    total = np.sum([np.asarray(a, np.float64) for a in x], axis=0)
    return [total.astype(np.float32) for _ in x]


def all_reduce_fast(x, algorithm: str = "ring", numerics: str = "fp32"):
    """The sum in the order the tiled program adds, rounded to the device dtype at every add."""
    n = len(x)
    flat = [np.asarray(a, np.float32).reshape(-1) for a in x]
    if n == 1:
        return [x[0].copy()]
    if algorithm == "tree":
        acc = list(flat)
        stride = 1
        while stride < n:
            for d in range(0, n, 2 * stride):
                if d + stride < n:
                    acc[d] = as_stored(acc[d] + acc[d + stride], numerics)
            stride *= 2
        total = acc[0]
    else:
        total = np.empty_like(flat[0])
        for c, (start, length) in enumerate(chunks(flat[0].size, n)):
            sl = slice(start, start + length)
            acc = flat[(c + 1) % n][sl]
            for j in range(2, n + 1):
                acc = as_stored(flat[(c + j) % n][sl] + acc, numerics)
            total[sl] = acc
    return [total.reshape(np.shape(x[0])) for _ in x]


def reduce_scatter_reference(x, algorithm: str = "ring"):
    total = np.sum([np.asarray(a, np.float64).reshape(-1) for a in x], axis=0).astype(np.float32)
    return [total[s : s + n] for s, n in chunks(total.size, len(x))]


def reduce_scatter_fast(x, algorithm: str = "ring", numerics: str = "fp32"):
    total = all_reduce_fast(x, algorithm, numerics)[0].reshape(-1)
    return [total[s : s + n] for s, n in chunks(total.size, len(x))]


def all_gather_reference(x, algorithm: str = "ring"):
    whole = np.concatenate([np.asarray(a, np.float32).reshape(-1) for a in x])
    return [whole for _ in x]


all_reduce = GroupKernel("all_reduce", all_reduce_emit, all_reduce_fast, all_reduce_reference)
reduce_scatter = GroupKernel(
    "reduce_scatter", reduce_scatter_emit, reduce_scatter_fast, reduce_scatter_reference
)
all_gather = GroupKernel("all_gather", all_gather_emit, all_gather_reference, all_gather_reference)


# ------------------------------------------------------------------------- cost model


def fastest_algorithm(group, kernel: GroupKernel, signature) -> tuple[str, object]:
    """The algorithm of ``kernel`` on ``group`` whose plan at ``signature`` (per input, per
    device (shape, dtype)) is the shortest, and that plan's ``GroupReport``: the ring, or the
    tree too where the topology is a switch (as NCCL picks by size)."""
    algorithms = ("ring", "tree") if group.link.topology == "switch" else ("ring",)
    reports = {a: group.plan(kernel, signature, {"algorithm": a}).report for a in algorithms}
    best = min(algorithms, key=lambda a: reports[a].cycles)
    return best, reports[best]


def ring_all_reduce_cycles(link, n: int, nbytes: float, add_cycles: float) -> float:
    """The ring all-reduce's time when its sends never wait for DRAM: 2 (N - 1) sends of one
    chunk (nbytes / N) each, latency then bytes at the link bandwidth, and N - 1 chunk
    reductions of ``add_cycles`` each between the reduce-scatter's sends."""
    if n == 1:
        return 0.0
    send = link.latency_cycles + nbytes / n / link.bytes_per_cycle
    return 2 * (n - 1) * send + (n - 1) * add_cycles


def chunk_add_cycles(cfg, nbytes: int, dtype: str = "bf16") -> float:
    """One chunk's reduction in a single tile, from the moment its received copy has landed:
    the device's own copy was loaded while the send was in flight (it depends on nothing), so
    what remains is the received copy's load, the add and the store, a DMA costing
    ``dma_dram_latency + bytes / queue rate``."""
    elements = nbytes // itemsize(dtype)
    dma = cfg.dma_dram_latency + nbytes / cfg.dma_queue_bytes_per_cycle
    return 2 * dma + cfg.vector_latency + math.ceil(elements / cfg.vector_lanes)
