"""A device group: N emulated NPUs, each with its own DRAM, and the links between them.

    group = DeviceGroup("tiny", 4, mode="tile")              # the link: the chip preset's
    out, report = group.run(all_reduce, [x0, x1, x2, x3])    # one array per device per input

A ``GroupKernel`` is the multi-device twin of a ``Kernel``. ``emit(g, *inputs, **consts)``
gets a ``GroupContext`` ``g``: ``g[d]`` is device d's ``KernelContext`` (every call of a
single-device kernel), plus ``g[d].send(dst_device, dst_view, src_view)``, a transfer from
device d's DRAM to another device's DRAM over the links. Each input is a list of one DRAM
buffer per device; emit returns each output as such a list, made with ``g[d].output``.
``fast(*inputs, **consts)`` computes the same on lists of arrays (with a ``numerics``
parameter, as ``Kernel.fast``).

One timeline: every device's instructions and every transfer are scheduled together (the
scheduler of timing.py), so the group's cycles are its critical path, communication included,
and a kernel overlaps a transfer with compute wherever its dependencies allow. Each device keeps
its own units, DMA queues and DRAM bandwidth; a transfer runs on a link queue of its own per
(source, destination) pair: the link's latency, then its bytes at the link's bandwidth,
split with every other transfer in flight on a resource it uses: the two devices' DRAM, and
the path (``LinkConfig.topology``): on a ``ring`` the directed link between neighbours, on a
``switch`` the source's egress and the destination's ingress port.

DRAM capacity is per device: a shard that does not fit raises ``AllocationError`` naming the
device, the tensor, the bytes asked and the capacity, and leaves no shard behind.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from . import dma as dma_mod
from .config import LinkConfig, NPUConfig, get_link, get_preset
from .device import NPU, DeviceTensor, _freeze, _parameters
from .errors import AllocationError, KernelError
from .memory import DRAM, DTYPES, Buffer, itemsize, store_value
from .program import KernelContext, _as_view
from .report import CycleReport, unit_bounds
from .timing import Schedule, _schedule


@dataclass(frozen=True)
class GroupKernel:
    """A program over a device group: ``emit(g, *inputs, **consts)`` and its whole-array twin
    ``fast(*inputs, **consts)``, inputs and outputs lists of one array per device; ``reference``
    the plain NumPy definition tests compare against."""

    name: str
    emit: Callable
    fast: Callable
    reference: Callable | None = None

    def __post_init__(self):
        params = _parameters(self.fast)
        object.__setattr__(self, "_fast_numerics", params is not None and "numerics" in params)
        emit_params = list((_parameters(self.emit) or {}).values())[1:]
        object.__setattr__(self, "_input_names", [p.name for p in emit_params])

    def input_names(self, count: int) -> list[str]:
        names = self._input_names
        return [names[i] if i < len(names) else f"in{i}" for i in range(count)]


class DeviceContext(KernelContext):
    """Device d's ``KernelContext`` inside a group: its buffers know their device, and ``send``
    moves a region to another device."""

    def __init__(self, group: GroupContext, device: int, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group
        self.device = device

    def alloc(self, *args, **kwargs) -> Buffer:
        buf = super().alloc(*args, **kwargs)
        buf.device = self.device
        return buf

    def dram(self, *args, **kwargs) -> Buffer:
        buf = super().dram(*args, **kwargs)
        buf.device = self.device
        return buf

    def send(self, dst_device: int, dst, src, *, after=()) -> int:
        """Copy ``src`` (this device's DRAM) to ``dst`` (device ``dst_device``'s DRAM) over the
        links: same shape and dtype, 1-3-D, as a DMA descriptor."""
        g = self.group
        dst, src = _as_view(dst), _as_view(src)
        iid = len(self._ops)
        label = f"send #{iid} {src.name}@{self.device} -> {dst.name}@{dst_device}"
        if not 0 <= dst_device < g.num_devices or dst_device == self.device:
            raise KernelError(
                f"{label}: destination device {dst_device} is not another device of the group "
                f"({g.num_devices} devices, this is {self.device})"
            )
        for view, device, role in ((src, self.device, "source"), (dst, dst_device, "destination")):
            if view.buffer.memory != DRAM:
                raise KernelError(
                    f"{label}: the {role} {view.name!r} is in {view.buffer.where}; links move DRAM to DRAM"
                )
            if getattr(view.buffer, "device", None) != device:
                raise KernelError(
                    f"{label}: the {role} {view.name!r} lives on device "
                    f"{getattr(view.buffer, 'device', None)}, not device {device}"
                )
        _, nbytes, _ = dma_mod.check_dma(self.config, label, dst, src)
        path = g.path(self.device, dst_device, label)
        key = f"dram->link{self.device}->{dst_device}"
        self.bytes_by_path[key] = self.bytes_by_path.get(key, 0) + nbytes
        if self.track:
            self._check_read(label, src)
            if self.execute:
                dst.array()[...] = store_value(src.array(), dst.dtype, self.numerics)
            self._mark(dst)
        unit = g.link_unit(self.device, dst_device)
        # _record takes this context's unit number: the link unit lies past every device's,
        # so it counts as a DMA queue (its descriptors' latencies overlap).
        iid = self._record(
            unit - self.unit_base, "send", label, g.link.latency_cycles, nbytes, 0, [src], [dst], after
        )
        g.link_res[iid] = path + (("dram", self.device), ("dram", dst_device))
        return iid


class GroupContext:
    """What a group kernel sees: ``g[d]`` device d's context, ``g.config``, ``g.link``,
    ``g.num_devices``; all of them record into one instruction stream."""

    def __init__(self, name, config: NPUConfig, link: LinkConfig, drams, *, execute, numerics, dtype, verify):
        self.config, self.link, self.num_devices = config, link, len(drams)
        self.devices: list[DeviceContext] = []
        for d, dram in enumerate(drams):
            k = DeviceContext(
                self,
                d,
                f"{name}@{d}",
                config,
                execute=execute,
                numerics=numerics,
                dtype=dtype,
                dram=dram,
                verify=verify,
            )
            if d:
                k.share_stream(self.devices[0], d * k.n_units)
            self.devices.append(k)
        self.units_per_device = self.devices[0].n_units
        self.links: dict[tuple[int, int], int] = {}  # (src, dst) -> index of its link queue
        self.link_res: dict[int, tuple] = {}  # send id -> resources it uses
        self.returned: list[list[Buffer]] = []  # emit's outputs, per output one buffer per device

    def __getitem__(self, d: int) -> DeviceContext:
        return self.devices[d]

    def __iter__(self):
        return iter(self.devices)

    def __len__(self) -> int:
        return self.num_devices

    def path(self, src: int, dst: int, label: str) -> tuple:
        """The link resources a transfer from ``src`` to ``dst`` uses."""
        n = self.num_devices
        if self.link.topology == "switch":
            return (("egress", src), ("ingress", dst))
        if dst not in ((src + 1) % n, (src - 1) % n):
            raise KernelError(
                f"{label}: devices {src} and {dst} are not neighbours on the {self.link.name} ring "
                f"of {n} devices; route through the devices between them"
            )
        return (("link", src, dst),)

    def link_unit(self, src: int, dst: int) -> int:
        index = self.links.setdefault((src, dst), len(self.links))
        return self.num_devices * self.units_per_device + index


@dataclass
class GroupReport:
    """What one group kernel cost: the critical path over every device and link, a
    ``CycleReport`` per device (its units and bytes over the group's span), and per link queue
    the bytes it moved and its busy cycles."""

    name: str
    npu: str
    link: str
    clock_hz: float
    cycles: int
    devices: list[CycleReport]
    links: dict[str, dict]  # "link0->1" -> {"bytes", "busy_cycles", "bound_cycles"}
    link_bound_cycles: float  # the busiest link resource's bytes / its bandwidth
    schedule: object = field(default=None, compare=False, repr=False)
    stream: object = field(default=None, compare=False, repr=False)
    units_per_device: int = 0

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def time_us(self) -> float:
        return self.cycles / self.clock_hz * 1e6

    @property
    def link_bytes(self) -> int:
        return sum(v["bytes"] for v in self.links.values())

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "npu": self.npu,
            "link": self.link,
            "num_devices": self.num_devices,
            "cycles": self.cycles,
            "emulated_us": self.time_us,
            "link_bytes": self.link_bytes,
            "link_bound_cycles": self.link_bound_cycles,
            "links": {k: dict(v) for k, v in self.links.items()},
            "devices": [r.to_dict() for r in self.devices],
        }

    def write_trace(self, path) -> str:
        """The timeline as Perfetto JSON: a process per device's engines and DMA queues, one
        for the links with a track per link queue."""
        from .trace import write_group_trace

        if self.schedule is None:
            raise ValueError(f"report {self.name!r} has no schedule")
        return write_group_trace(path, self)

    def __str__(self) -> str:
        lines = [
            f"GroupReport {self.name!r}: {self.num_devices} x {self.npu} over {self.link} "
            f"({self.clock_hz / 1e9:g} GHz)",
            f"  total            {self.cycles:>14,} cycles  {self.time_us:>12,.3f} us",
            f"  link bound       {math.ceil(self.link_bound_cycles):>14,} cycles  "
            "(the busiest link resource: bytes / link bandwidth)",
            f"  {'link':<18}{'bytes':>14}{'busy cycles':>14}",
        ]
        for name, v in self.links.items():
            lines.append(f"  {name:<18}{v['bytes']:>14,}{v['busy_cycles']:>14,}")
        lines.append(f"  {'device':<18}{'busy DMA':>14}{'busy vector':>14}{'flops':>14}")
        for d, r in enumerate(self.devices):
            dma = sum(b for u, b in r.unit_busy.items() if u.startswith("dma."))
            vec = sum(b for u, b in r.unit_busy.items() if u.endswith(".vector"))
            lines.append(f"  {d:<18}{dma:>14,}{vec:>14,}{r.flops:>14,}")
        return "\n".join(lines)


@dataclass
class _GroupPlan:
    report: GroupReport
    outputs: list[list[tuple[str, tuple, str]]]  # per output, per device (name, shape, dtype)


class DeviceGroup:
    """N NPUs of one chip preset joined by ``link`` (a ``LinkConfig``, a link preset name, or
    None for the chip preset's default, see ``config.DEVICE_LINKS``)."""

    def __init__(
        self,
        config: str | NPUConfig = "atom",
        num_devices: int = 2,
        *,
        link: str | LinkConfig | None = None,
        mode: str = "fast",
        numerics: str = "bf16",
        dtype: str = "bf16",
    ):
        if not isinstance(num_devices, int) or isinstance(num_devices, bool) or num_devices < 1:
            raise ValueError(f"num_devices must be a positive integer, got {num_devices!r}")
        self.config = get_preset(config)
        self.link = get_link(link, self.config)
        self.devices = [
            NPU(self.config, mode=mode, numerics=numerics, dtype=dtype) for _ in range(num_devices)
        ]
        for d, npu in enumerate(self.devices):
            npu.dram.label = f"DRAM of device {d}"  # capacity errors name the device
        self.mode, self.numerics, self.dtype = mode, numerics, self.devices[0].dtype
        self._plans: dict = {}
        self.last_report: GroupReport | None = None

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def __repr__(self):
        return f"DeviceGroup({self.config.name!r}, {self.num_devices}, link={self.link.name!r}, mode={self.mode!r})"

    # ------------------------------------------------------------------ DRAM

    def shard(self, arrays, dtype: str | None = None, *, name: str = "tensor") -> list[DeviceTensor]:
        """Copy ``arrays[d]`` into device d's DRAM, all or none: a shard that does not fit raises
        ``AllocationError`` naming the device, and the shards already placed are freed."""
        if len(arrays) != self.num_devices:
            raise ValueError(f"shard {name!r}: {len(arrays)} arrays for {self.num_devices} devices")
        placed = []
        try:
            for d, a in enumerate(arrays):
                placed.append(self.devices[d].to_device(a, dtype, name=name))
        except BaseException:
            for t in placed:
                t.npu.free(t)
            raise
        return placed

    def check_fits(self, name: str, nbytes: list[int]) -> None:
        """Plan-only capacity check: ``nbytes[d]`` more bytes on device d, else
        ``AllocationError`` naming the device, the bytes and the capacity."""
        for d, (npu, n) in enumerate(zip(self.devices, nbytes)):
            free = npu.dram.capacity - npu.dram.used
            if n > free:
                raise AllocationError(
                    f"{name!r} does not fit device {d} of {self.num_devices} ({self.config.name}): "
                    f"asked {n:,} B, {free:,} B free of {npu.dram.capacity:,} B capacity"
                )

    # ------------------------------------------------------------------ runs

    def run(self, kernel: GroupKernel, *inputs, trace=None, **consts):
        """Run ``kernel`` on ``inputs``, each a sequence of one array (or DeviceTensor) per
        device. Returns ``(outputs, report)``: each output a list of one array per device (a
        single output unwrapped), and the ``GroupReport``."""
        names = kernel.input_names(len(inputs))
        temps, tensors = [], []
        try:
            for name, per_device in zip(names, inputs):
                if len(per_device) != self.num_devices:
                    raise ValueError(
                        f"{kernel.name}: input {name!r} has {len(per_device)} shards for {self.num_devices} devices"
                    )
                row = []
                for d, x in enumerate(per_device):
                    if isinstance(x, DeviceTensor):
                        if x.npu is not self.devices[d]:
                            raise KernelError(f"{kernel.name}: shard {d} of {name!r} lives on another NPU")
                        row.append(x)
                    else:
                        t = self.devices[d].to_device(x, name=name)
                        temps.append(t)
                        row.append(t)
                tensors.append(row)
            if self.mode == "tile":
                g, report = self._emit(kernel, tensors, consts, execute=True)
                outputs = [[b.data for b in out] for out in g.returned]
            else:
                outputs, report = self._run_fast(kernel, tensors, consts)
        finally:
            for t in temps:
                t.npu.free(t)
        if trace is not None:
            report.write_trace(trace)
        self.last_report = report
        return (outputs[0] if len(outputs) == 1 else tuple(outputs)), report

    def plan(self, kernel: GroupKernel, signature, consts) -> _GroupPlan:
        """The cached schedule of ``kernel`` for ``signature``: per input, per device
        (shape, dtype)."""
        signature = tuple(tuple((tuple(s), d) for s, d in row) for row in signature)
        key = (kernel.name, kernel.emit, signature, _freeze(consts))
        plan = self._plans.get(key)
        if plan is None:
            shells = []
            for name, row in zip(kernel.input_names(len(signature)), signature):
                shells.append(
                    [
                        DeviceTensor(self.devices[d], Buffer(name, DRAM, s, dt, 0, 0))
                        for d, (s, dt) in enumerate(row)
                    ]
                )
            g, report = self._emit(kernel, shells, consts, execute=False)
            outputs = [[(b.name, b.shape, b.dtype) for b in out] for out in g.returned]
            plan = self._plans[key] = _GroupPlan(report, outputs)
        return plan

    def _run_fast(self, kernel, tensors, consts):
        plan = self.plan(kernel, [[(t.shape, t.dtype) for t in row] for row in tensors], consts)
        arrays = [[t.buffer.data for t in row] for row in tensors]
        if kernel._fast_numerics:
            numerics = self.numerics if self.dtype == "bf16" else "fp32"
            results = kernel.fast(*arrays, numerics=numerics, **consts)
        else:
            results = kernel.fast(*arrays, **consts)
        if len(plan.outputs) == 1:
            results = [results]
        if len(results) != len(plan.outputs):
            raise KernelError(
                f"kernel {kernel.name!r}: fast returned {len(results)} outputs, emit made {len(plan.outputs)}"
            )
        outputs = []
        for res, specs in zip(results, plan.outputs):
            row = []
            for d, (r, (name, shape, dtype)) in enumerate(zip(res, specs)):
                r = np.asarray(r)
                if r.shape != shape:
                    raise KernelError(
                        f"kernel {kernel.name!r}: fast output {name!r} on device {d} has shape {r.shape}, "
                        f"the tiled program's has {shape}"
                    )
                row.append(store_value(r, dtype, self.numerics).astype(DTYPES[dtype][1], copy=False))
            outputs.append(row)
        return outputs, plan.report

    def _emit(self, kernel, tensors, consts, execute):
        cfg, n = self.config, self.num_devices
        g = GroupContext(
            kernel.name,
            cfg,
            self.link,
            [npu.dram for npu in self.devices],
            execute=execute,
            numerics=self.numerics,
            dtype=self.dtype,
            verify=True,
        )
        bufs = []
        for row in tensors:
            hs = []
            for d, t in enumerate(row):
                b = t.buffer
                h = Buffer(
                    b.name, DRAM, b.shape, b.dtype, b.address, b.nbytes, data=b.data if execute else None
                )
                if execute:
                    h.written = np.ones(b.shape, np.bool_)
                h.device = d
                hs.append(h)
            bufs.append(hs)
        try:
            returned = kernel.emit(g, *bufs, **consts)
            if isinstance(returned, (list, tuple)) and returned and isinstance(returned[0], Buffer):
                returned = [returned]
            returned = [list(out) for out in returned]
            made = [[id(b) for b in k.outputs] for k in g]
            got = [[] for _ in range(n)]
            for out in returned:
                if len(out) != n:
                    raise KernelError(
                        f"kernel {kernel.name!r}: an output has {len(out)} shards for {n} devices"
                    )
                for d, b in enumerate(out):
                    got[d].append(id(b))
            if got != made:
                raise KernelError(
                    f"kernel {kernel.name!r} must return, per output, the buffer each device made with "
                    "g[d].output, in order"
                )
            for k in g:
                k.check_outputs_written()
            stream, sched = _schedule_group(g)
        finally:
            for k in g:
                k.release_all()
        g.returned = returned
        report = self._report(kernel, g, bufs, stream, sched)
        return g, report

    def _report(self, kernel, g, bufs, stream, sched) -> GroupReport:
        cfg, upd, n = self.config, g.units_per_device, self.num_devices
        cycles = math.ceil(sched.total - 1e-9) + cfg.kernel_launch_cycles
        devices = []
        for d, k in enumerate(g):
            sub = _device_stream(stream, d, upd, k)
            io = k.roofline_bytes
            if io is None:
                io = sum(math.prod(row[d].shape) * itemsize(row[d].dtype) for row in bufs)
                io += sum(math.prod(b.shape) * itemsize(b.dtype) for b in k.outputs)
            counts: dict[str, int] = {}
            for op in sub.ops:
                counts[op] = counts.get(op, 0) + 1
            devices.append(
                CycleReport(
                    name=f"{kernel.name}@{d}",
                    npu=cfg.name,
                    clock_hz=cfg.clock_hz,
                    cycles=cycles,
                    unit_busy={
                        u: int(round(b)) for u, b in zip(sub.unit_names, sched.busy[d * upd : (d + 1) * upd])
                    },
                    bytes_by_path=dict(k.bytes_by_path),
                    peak_local_sram=k.peak_local,
                    peak_shared_sram=k.peak_shared,
                    local_sram_bytes=cfg.local_sram_bytes,
                    shared_sram_bytes=cfg.shared_sram_bytes,
                    instructions=counts,
                    flops=k.flops,
                    io_bytes=io,
                    peak_flops_per_cycle=cfg.peak_flops_per_cycle,
                    dram_bytes_per_cycle=cfg.dram_bytes_per_cycle,
                    bounds=unit_bounds(sub, cfg, k.flops, io),
                )
            )
        links, per_res = {}, {}
        for (s, d), index in g.links.items():
            unit = n * upd + index
            mask = stream.unit == unit
            moved = int(stream.nbytes[mask].sum())
            links[f"link{s}->{d}"] = {
                "bytes": moved,
                "busy_cycles": int(round(sched.busy[unit])),
                "bound_cycles": moved / g.link.bytes_per_cycle,
            }
            for key in g.path(s, d, "report"):
                per_res[key] = per_res.get(key, 0) + moved
        bound = max(per_res.values(), default=0) / g.link.bytes_per_cycle
        return GroupReport(
            name=kernel.name,
            npu=cfg.name,
            link=g.link.name,
            clock_hz=cfg.clock_hz,
            cycles=cycles,
            devices=devices,
            links=links,
            link_bound_cycles=bound,
            schedule=sched,
            stream=stream,
            units_per_device=upd,
        )


@dataclass
class _Stream:
    """The group's instruction stream: the arrays ``timing._schedule`` reads, and names."""

    unit: np.ndarray
    dur: np.ndarray
    hide: np.ndarray
    nbytes: np.ndarray
    res_local: np.ndarray  # resource flags of device-local DMAs (dma.RES_*), 0 for sends
    ops: list[str]
    labels: list[str]
    unit_names: list[str]
    unit_is_dma: np.ndarray

    def __len__(self):
        return len(self.ops)


def _schedule_group(g: GroupContext):
    """Schedule every device's instructions and the sends on one timeline."""
    cfg, n, upd = g.config, g.num_devices, g.units_per_device
    k0 = g[0]
    stream0 = k0.stream()  # the shared lists: every device's instructions and the sends
    n_units = n * upd + len(g.links)
    names = []
    for d in range(n):
        names += [f"device{d}.{u}" for u in stream0.unit_names]
    names += [f"link{s}->{t}" for (s, t) in g.links]
    unit_is_dma = np.zeros(n_units, np.bool_)
    queue_rate = np.full(n_units, float(cfg.dma_queue_bytes_per_cycle))
    for d in range(n):
        unit_is_dma[d * upd + k0.first_dma_unit : (d + 1) * upd] = True
    unit_is_dma[n * upd :] = True
    queue_rate[n * upd :] = g.link.bytes_per_cycle
    # Resources, numbered as first used: each device's DRAM, shared-SRAM ports and host link,
    # and the link resources of the topology.
    rates = {
        "dram": cfg.dram_bytes_per_cycle * cfg.dram_efficiency,
        "shared": cfg.shared_sram_bytes_per_cycle,
    }
    rates["host"] = cfg.host_bytes_per_cycle
    index: dict[tuple, int] = {}
    res_rate: list[float] = []

    def bit(key) -> int:
        if key not in index:
            if len(index) == 63:
                raise NotImplementedError(
                    f"a group schedule with more than 63 shared resources ({n} devices over "
                    f"{g.link.name}): the scheduler's resource flags are one int64"
                )
            index[key] = len(index)
            res_rate.append(rates.get(key[0], g.link.bytes_per_cycle))
        return 1 << index[key]

    local_flags = ((dma_mod.RES_DRAM, "dram"), (dma_mod.RES_SHARED, "shared"), (dma_mod.RES_HOST, "host"))
    res = np.zeros(len(stream0), np.int64)
    for i in range(len(stream0)):
        u = int(stream0.unit[i])
        if u >= n * upd:
            for key in g.link_res[i]:
                res[i] |= bit(key)
        elif stream0.res[i]:
            d = u // upd
            for flag, kind in local_flags:
                if stream0.res[i] & flag:
                    res[i] |= bit((kind, d))
    unit = stream0.unit
    order = np.argsort(unit, kind="stable").astype(np.int64)
    counts = np.bincount(unit, minlength=n_units)
    u_ptr = np.zeros(n_units + 1, np.int64)
    np.cumsum(counts, out=u_ptr[1:])
    start, data_start, end, busy, total = _schedule(
        unit,
        unit_is_dma[unit] if len(unit) else np.zeros(0, np.bool_),
        stream0.dur,
        stream0.hide,
        stream0.nbytes,
        res,
        stream0.dep_ptr,
        stream0.dep_idx,
        u_ptr,
        order,
        unit_is_dma,
        queue_rate,
        np.array(res_rate or [1.0], np.float64),
        int(cfg.dma_outstanding),
    )
    if total < 0:
        raise RuntimeError("scheduler found no next event: the group's instruction stream is inconsistent")
    stream = _Stream(
        unit=unit,
        dur=stream0.dur,
        hide=stream0.hide,
        nbytes=stream0.nbytes,
        res_local=stream0.res,
        ops=stream0.ops,
        labels=stream0.labels,
        unit_names=names,
        unit_is_dma=unit_is_dma,
    )
    return stream, Schedule(start, data_start, end, busy, float(total))


def _device_stream(stream: _Stream, d: int, upd: int, k: KernelContext):
    """Device d's instructions as a single-device stream (for its per-unit bounds)."""
    from .program import InstructionStream

    mask = (stream.unit >= d * upd) & (stream.unit < (d + 1) * upd)
    unit = stream.unit[mask] - d * upd
    n = int(mask.sum())
    names = [f"engine{e}.{u}" for e in k.engines for u in ("matrix", "vector", "sfu")]
    names += [f"dma.q{q}" for q in range(k.config.dma_queues)]
    return InstructionStream(
        n_units=upd,
        first_dma_unit=k.first_dma_unit,
        unit_names=names,
        unit=unit,
        is_dma=unit >= k.first_dma_unit,
        dur=stream.dur[mask],
        hide=stream.hide[mask],
        nbytes=stream.nbytes[mask],
        res=stream.res_local[mask],
        dep_ptr=np.zeros(n + 1, np.int64),
        dep_idx=np.zeros(0, np.int64),
        ops=[op for op, m in zip(stream.ops, mask) if m],
        labels=[lb for lb, m in zip(stream.labels, mask) if m],
    )


__all__ = ["DeviceGroup", "GroupKernel", "GroupContext", "DeviceContext", "GroupReport"]
