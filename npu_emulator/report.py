"""CycleReport: what one kernel run (or a sequence of them) cost on the emulated chip."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .memory import DRAM


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
    def roofline_cycles(self) -> float:
        """max(FLOPs / peak FLOPs per cycle, compulsory DRAM bytes / DRAM bytes per cycle)."""
        return max(self.compute_bound_cycles, self.memory_bound_cycles)

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
        busy: dict[str, int] = {}
        paths: dict[str, int] = {}
        instr: dict[str, int] = {}
        for r in reports:
            for d, src in ((busy, r.unit_busy), (paths, r.bytes_by_path), (instr, r.instructions)):
                for k, v in src.items():
                    d[k] = d.get(k, 0) + v
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
        )

    # ------------------------------------------------------------- printing

    def __str__(self) -> str:
        lines = [
            f"CycleReport {self.name!r} on {self.npu} ({self.clock_hz / 1e9:g} GHz)",
            f"  total            {self.cycles:>14,} cycles  {self.time_us:>12,.3f} us",
            f"  roofline         {math.ceil(self.roofline_cycles):>14,} cycles  "
            f"{self.pct_of_roofline:>11.1f} %   = max(FLOPs / peak, DRAM bytes / bandwidth)",
            f"    compute bound  {math.ceil(self.compute_bound_cycles):>14,} cycles  "
            f"({self.flops:,} FLOP / {self.peak_flops_per_cycle:,} FLOP/cycle)",
            f"    memory bound   {math.ceil(self.memory_bound_cycles):>14,} cycles  "
            f"({self.io_bytes:,} B / {self.dram_bytes_per_cycle:g} B/cycle)",
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
