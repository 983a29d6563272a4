"""CycleReport: what one kernel run (or a sequence of them) cost on the emulated chip.

The roofline is per unit: each unit's lower bound in cycles for the work the kernel gave it,
with the peaks read from the chip's ``NPUConfig``; the largest bound is the roofline and names
the binding unit. No schedule beats any of them:

    matrix       FLOPs / peak_flops_per_cycle (every engine's MAC array)
    vector, sfu  the unit's instruction cycles summed over engines / num_engines (the work
                 spread evenly; each unit runs one instruction at a time)
    dma.q<i>     bytes queue i moves / dma_queue_bytes_per_cycle (a queue moves its bytes in order)
    dram         compulsory DRAM bytes (inputs and outputs, or ``set_roofline_bytes``) / dram_bytes_per_cycle
    shared_sram  bytes through the shared-SRAM ports / shared_sram_bytes_per_cycle
    host_link    bytes over the host link / host_bytes_per_cycle
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .dma import RES_HOST, RES_SHARED
from .memory import DRAM

# How the report prints each bound's formula.
BOUND_FORMULAS = {
    "matrix": "FLOPs / peak FLOPs per cycle",
    "vector": "vector cycles / engines",
    "sfu": "SFU cycles / engines",
    "dram": "compulsory DRAM bytes / bandwidth",
    "shared_sram": "shared-SRAM bytes / port bandwidth",
    "host_link": "host bytes / link bandwidth",
}


def unit_bounds(stream, cfg, flops: int, io_bytes: int) -> dict[str, float]:
    """Each unit's lower bound in cycles (see the module docstring) for an instruction stream
    scheduled on ``cfg``; DMA queues and optional resources appear only when used."""
    # DRAM and matrix first: on a tie the classic roofline's terms are named binding.
    bounds = {"dram": io_bytes / cfg.dram_bytes_per_cycle, "matrix": flops / cfg.peak_flops_per_cycle}
    unit, dur = stream.unit, stream.dur
    engine_part = unit < stream.first_dma_unit
    kinds = unit % 3
    for kind, name in ((1, "vector"), (2, "sfu")):
        bounds[name] = float(dur[engine_part & (kinds == kind)].sum()) / cfg.num_engines
    q_bytes = np.bincount(unit[~engine_part] - stream.first_dma_unit, stream.nbytes[~engine_part])
    for q in np.flatnonzero(q_bytes):
        bounds[f"dma.q{q}"] = float(q_bytes[q]) / cfg.dma_queue_bytes_per_cycle
    for flag, name, rate in (
        (RES_SHARED, "shared_sram", cfg.shared_sram_bytes_per_cycle),
        (RES_HOST, "host_link", cfg.host_bytes_per_cycle),
    ):
        moved = float(stream.nbytes[(stream.res & flag) != 0].sum())
        if moved:
            bounds[name] = moved / rate
    return bounds


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return str(n)


@dataclass
class CycleReport:
    name: str
    npu: str
    clock_hz: float
    cycles: int  # total, from the first instruction's start to the last one's end
    unit_busy: dict[str, int]  # unit name -> busy cycles (DMA queue: cycles with work in flight)
    bytes_by_path: dict[str, int]  # "src->dst" memory levels -> bytes moved by descriptors
    peak_local_sram: list[int]  # per engine, bytes
    peak_shared_sram: int
    local_sram_bytes: int
    shared_sram_bytes: int
    instructions: dict[str, int]  # op -> count
    flops: int  # matrix-unit FLOPs (2 per multiply-add)
    io_bytes: int  # bytes of the kernel's DRAM inputs and outputs: the compulsory traffic
    peak_flops_per_cycle: int
    dram_bytes_per_cycle: float
    # unit -> lower bound in cycles (``unit_bounds``); None (a report saved before there were
    # per-unit bounds) means the matrix and DRAM bounds only.
    bounds: dict[str, float] | None = None
    schedule: object = field(default=None, compare=False, repr=False)
    stream: object = field(default=None, compare=False, repr=False)

    # ------------------------------------------------------------- derived figures

    @property
    def time_us(self) -> float:
        return self.cycles / self.clock_hz * 1e6

    @property
    def dram_bytes(self) -> int:
        """Bytes moved to or from DRAM by the kernel's descriptors."""
        return sum(b for path, b in self.bytes_by_path.items() if DRAM in path.split("->"))

    @property
    def compute_bound_cycles(self) -> float:
        return self.flops / self.peak_flops_per_cycle

    @property
    def memory_bound_cycles(self) -> float:
        return self.io_bytes / self.dram_bytes_per_cycle

    @property
    def unit_bounds(self) -> dict[str, float]:
        """Each unit's lower bound in cycles (see the module docstring)."""
        if self.bounds is None:
            return {"dram": self.memory_bound_cycles, "matrix": self.compute_bound_cycles}
        return self.bounds

    @property
    def binding_unit(self) -> str:
        """The unit whose bound is the roofline (the first listed on ties)."""
        bounds = self.unit_bounds
        return max(bounds, key=lambda u: bounds[u])

    @property
    def roofline_cycles(self) -> float:
        """The largest per-unit lower bound: the binding unit's."""
        return max(self.unit_bounds.values())

    @property
    def pct_of_roofline(self) -> float:
        return 100.0 * self.roofline_cycles / self.cycles if self.cycles else 0.0

    def utilisation(self) -> dict[str, float]:
        """Busy fraction per kind of unit (mean over its units) and of DRAM bandwidth."""
        groups: dict[str, list[float]] = {}
        for unit, busy in self.unit_busy.items():
            kind = "dma" if unit.startswith("dma.") else unit.split(".")[1]
            groups.setdefault(kind, []).append(busy)
        out = {kind: (sum(b) / (len(b) * self.cycles) if self.cycles else 0.0) for kind, b in groups.items()}
        out["dram"] = self.dram_bytes / (self.cycles * self.dram_bytes_per_cycle) if self.cycles else 0.0
        return out

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "npu": self.npu,
            "cycles": self.cycles,
            "emulated_us": self.time_us,
            "flops": self.flops,
            "dram_bytes": self.dram_bytes,
            "io_bytes": self.io_bytes,
            "roofline_cycles": self.roofline_cycles,
            "pct_of_roofline": self.pct_of_roofline,
            "binding_unit": self.binding_unit,
            "unit_bounds": dict(self.unit_bounds),
            "utilisation": self.utilisation(),
            "bytes_by_path": dict(self.bytes_by_path),
            "peak_local_sram": max(self.peak_local_sram, default=0),
            "peak_shared_sram": self.peak_shared_sram,
            "instructions": dict(self.instructions),
        }

    def write_trace(self, path) -> str:
        """Write the timeline as Chrome-trace / Perfetto JSON (needs a scheduled report)."""
        from .trace import write_trace

        if self.schedule is None:
            raise ValueError(f"report {self.name!r} has no schedule (combined reports have none)")
        return write_trace(path, self)

    # ------------------------------------------------------------- combining

    @classmethod
    def sequence(cls, name: str, reports: list[CycleReport]) -> CycleReport:
        """Reports of kernels run one after another: cycles, busy time and bytes add up."""
        if not reports:
            raise ValueError("CycleReport.sequence needs at least one report")
        first = reports[0]
        bounds: dict[str, float] = {}  # lower bounds of kernels run one after another add up
        for r in reports:
            for u, b in r.unit_bounds.items():
                bounds[u] = bounds.get(u, 0.0) + b
        busy: dict[str, int] = {}
        paths: dict[str, int] = {}
        instr: dict[str, int] = {}
        times: dict[int, list] = {}  # id -> [report, how often]: a model's steps repeat their reports
        for r in reports:
            seen = times.get(id(r))
            if seen is None:
                times[id(r)] = [r, 1]
            else:
                seen[1] += 1
        for r, n in times.values():  # integer counts: the same sums in any order
            for d, src in ((busy, r.unit_busy), (paths, r.bytes_by_path), (instr, r.instructions)):
                for k, v in src.items():
                    d[k] = d.get(k, 0) + v * n
        return cls(
            name=name,
            npu=first.npu,
            clock_hz=first.clock_hz,
            cycles=sum(r.cycles for r in reports),
            unit_busy=busy,
            bytes_by_path=paths,
            peak_local_sram=[max(p) for p in zip(*(r.peak_local_sram for r in reports))],
            peak_shared_sram=max(r.peak_shared_sram for r in reports),
            local_sram_bytes=first.local_sram_bytes,
            shared_sram_bytes=first.shared_sram_bytes,
            instructions=instr,
            flops=sum(r.flops for r in reports),
            io_bytes=sum(r.io_bytes for r in reports),
            peak_flops_per_cycle=first.peak_flops_per_cycle,
            dram_bytes_per_cycle=first.dram_bytes_per_cycle,
            bounds=bounds,
        )

    # ------------------------------------------------------------- printing

    def __str__(self) -> str:
        lines = [
            f"CycleReport {self.name!r} on {self.npu} ({self.clock_hz / 1e9:g} GHz)",
            f"  total            {self.cycles:>14,} cycles  {self.time_us:>12,.3f} us",
            f"  roofline         {math.ceil(self.roofline_cycles):>14,} cycles  "
            f"{self.pct_of_roofline:>11.1f} %   = max over units of their bounds; binding: {self.binding_unit}",
        ]
        bounds = sorted(self.unit_bounds.items(), key=lambda ub: -ub[1])
        queues = [u for u, _ in bounds if u.startswith("dma.")]
        for u, b in bounds:
            if u.startswith("dma.") and u != queues[0]:
                continue  # the busiest queue stands for them all
            formula = BOUND_FORMULAS.get(
                u, f"the busiest of {len(queues)} queues used: bytes / queue bandwidth"
            )
            lines.append(f"    {u + ' bound':<17}{math.ceil(b):>10,} cycles  ({formula})")
        lines += [
            "",
            f"  {'unit':<18}{'busy cycles':>14}{'util':>8}",
        ]
        util = self.utilisation()
        for kind in ("matrix", "vector", "sfu", "dma"):
            members = {
                u: b
                for u, b in self.unit_busy.items()
                if (u.startswith("dma.") if kind == "dma" else u.endswith("." + kind))
            }
            if not members:
                continue
            lines.append(
                f"  {kind + f' (x{len(members)})':<18}{sum(members.values()):>14,}{100 * util[kind]:>7.1f}%"
            )
            for u, b in members.items():
                if b:
                    lines.append(f"    {u:<16}{b:>14,}{100 * b / max(self.cycles, 1):>7.1f}%")
        lines.append(f"  {'DRAM bandwidth':<18}{'':>14}{100 * util['dram']:>7.1f}%")
        lines.append("")
        lines.append("  bytes moved")
        for path, b in sorted(self.bytes_by_path.items()):
            lines.append(f"    {path:<16}{_fmt_bytes(b):>16}")
        lines.append(
            f"    {'DRAM total':<16}{_fmt_bytes(self.dram_bytes):>16}  (compulsory {_fmt_bytes(self.io_bytes)})"
        )
        peak_local = max(self.peak_local_sram, default=0)
        lines.append(
            f"  peak SRAM        local {_fmt_bytes(peak_local)} of {_fmt_bytes(self.local_sram_bytes)} "
            f"(busiest engine), shared {_fmt_bytes(self.peak_shared_sram)} of {_fmt_bytes(self.shared_sram_bytes)}"
        )
        counts = ", ".join(f"{op} {n:,}" for op, n in sorted(self.instructions.items()))
        lines.append(f"  instructions     {sum(self.instructions.values()):,}: {counts}")
        return "\n".join(lines)
