"""Hardware constants of the emulated NPU, and the named presets.

Every number a kernel may tile by or a cost formula uses lives here, in one frozen dataclass.
Kernels read tile sizes from the config (``k.config.mac_rows``), never from bare literals.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


@dataclass(frozen=True)
class NPUConfig:
    name: str = "custom"
    # Core clock. All costs are in cycles of this clock; the report converts to seconds with it.
    clock_hz: float = 1e9
    # Neural engines. Each has its own local SRAM, matrix unit, vector unit and SFU.
    num_engines: int = 8
    # Local SRAM per engine (bytes). Compute units read and write only their own engine's SRAM.
    local_sram_bytes: int = 4 * MiB
    # Shared SRAM (bytes), reached by DMA from every engine; a staging area between DRAM and
    # the engines that does not spend DRAM bandwidth when a tile is reused.
    shared_sram_bytes: int = 32 * MiB
    # Device memory (bytes).
    dram_bytes: int = 16 * GiB
    # Allocation granule of SRAM and DRAM (bytes); every buffer starts on a multiple of it and
    # its size is rounded up to it.
    sram_alignment: int = 64
    dram_alignment: int = 256
    # DRAM bandwidth in bytes per cycle, shared by all DMA transfers that touch DRAM.
    dram_bytes_per_cycle: float = 256.0
    # Aggregate shared-SRAM port bandwidth (bytes per cycle), shared by transfers touching it.
    shared_sram_bytes_per_cycle: float = 1024.0
    # Host link (PCIe) bandwidth in bytes per cycle, shared by host<->DRAM transfers.
    host_bytes_per_cycle: float = 64.0
    # Number of independent DMA queues. Descriptors on one queue complete in order; transfers
    # on different queues run concurrently and split the bandwidth of what they share.
    dma_queues: int = 16
    # The most one queue moves per cycle; several queues are needed to saturate DRAM.
    dma_queue_bytes_per_cycle: float = 64.0
    # Descriptors one queue may have in flight; their latencies overlap, their data phases don't.
    dma_outstanding: int = 4
    # Fixed cost of a descriptor before its first byte moves, by the slowest memory it touches.
    dma_dram_latency: int = 200
    dma_sram_latency: int = 32
    dma_host_latency: int = 1000
    # Largest region a descriptor moves: at most 3 dimensions (checked in the DMA code).
    dma_max_elements: int = 1 << 22
    # Matrix unit: a weight-stationary MAC array of mac_rows (contraction) x mac_cols (output
    # columns). One pass holds a (mac_rows, mac_cols) block of B and streams the rows of A
    # through it, one row per cycle; loading the block takes mac_rows cycles, overlapped with the
    # previous pass, so a pass costs max(M, mac_rows) cycles. Accumulation is fp32.
    mac_rows: int = 64
    mac_cols: int = 32
    # Pipeline fill plus drain of one matmul instruction (cycles); paid when the unit was idle,
    # hidden when the instruction follows the previous one back to back.
    mac_fill_drain: int = 96
    # Largest operands of one matmul instruction: A (M, K), B (K, N), accumulator (M, N).
    matmul_max_m: int = 512
    matmul_max_k: int = 512
    matmul_max_n: int = 512
    # Vector unit: elementwise ops and row reductions, vector_lanes fp32 elements per cycle.
    vector_lanes: int = 128
    vector_latency: int = 16
    # Special-function unit (exp, rsqrt, tanh, ...): sfu_lanes elements per cycle.
    sfu_lanes: int = 32
    sfu_latency: int = 32
    # Largest operand of one vector or SFU instruction (elements).
    vector_max_elements: int = 1 << 16

    def __post_init__(self):
        for f in fields(self):
            if f.name == "name":
                continue
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"NPUConfig.{f.name} must be a number, got {value!r}")
            if value <= 0:
                raise ValueError(f"NPUConfig.{f.name} must be positive, got {value}")
        for name in ("sram_alignment", "dram_alignment"):
            value = getattr(self, name)
            if value & (value - 1):
                raise ValueError(f"NPUConfig.{name} must be a power of two, got {value}")
        if self.dma_queue_bytes_per_cycle > self.dram_bytes_per_cycle * self.dma_queues:
            raise ValueError(
                "NPUConfig.dma_queue_bytes_per_cycle exceeds what all queues could ever use: "
                f"{self.dma_queue_bytes_per_cycle} > {self.dram_bytes_per_cycle} * {self.dma_queues}"
            )
        if self.matmul_max_k < self.mac_rows or self.matmul_max_n < self.mac_cols:
            raise ValueError(
                f"NPUConfig matmul limits (K {self.matmul_max_k}, N {self.matmul_max_n}) must hold "
                f"at least one MAC block ({self.mac_rows} x {self.mac_cols})"
            )
        for name in ("local_sram_bytes", "shared_sram_bytes"):
            if getattr(self, name) % self.sram_alignment:
                raise ValueError(
                    f"NPUConfig.{name} = {getattr(self, name)} is not a multiple of "
                    f"sram_alignment = {self.sram_alignment}"
                )

    def __repr__(self) -> str:
        """Short: the name, then the fields that differ from the nearest preset (or from the
        defaults), so a failing test case does not print thirty lines of constants."""

        def changed(base):
            return [
                f"{f.name}={getattr(self, f.name)!r}"
                for f in fields(self)
                if f.name != "name" and getattr(self, f.name) != getattr(base, f.name)
            ]

        bases = [("", NPUConfig())] + [(f"{name} with ", cfg) for name, cfg in PRESETS.items()]
        if self.name in PRESETS:
            bases = [("", PRESETS[self.name])]
        label, diff = min(((label, changed(base)) for label, base in bases), key=lambda ld: len(ld[1]))
        rest = label + ", ".join(diff) if diff else label.removesuffix(" with ")
        return f"NPUConfig({self.name!r}{', ' + rest if rest else ''})"

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self))  # hypothesis prints falsifying examples with this

    @property
    def peak_flops_per_cycle(self) -> int:
        """Matrix-unit peak over all engines: one multiply-add (2 FLOPs) per MAC per cycle."""
        return 2 * self.num_engines * self.mac_rows * self.mac_cols

    @property
    def peak_tflops(self) -> float:
        return self.peak_flops_per_cycle * self.clock_hz / 1e12

    def replace(self, **changes) -> NPUConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> NPUConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"NPUConfig has no field(s) {unknown}")
        return cls(**d)


# Rebellions ATOM. Confirmed public figures: 4 MiB local SRAM per neural engine, 32 MiB shared
# SRAM, 16 GiB GDDR6, PCIe 5.0 host link (x16: about 64 GB/s).
# UNCONFIRMED (recalled from spec sheets, not a primary source): 8 neural engines, 32 TFLOPS FP16,
# 256 GB/s DRAM. 1 GHz with a 64x32 MAC array per engine is our consistent choice giving
# 8 * 2048 MAC * 2 FLOP * 1 GHz = 32.8 TFLOPS; 256 B/cycle at 1 GHz = 256 GB/s.
# DMA latencies, queue counts, vector and SFU widths are our own modelling choices.
ATOM = NPUConfig(name="atom")

# A small chip for tests: one engine, little SRAM, a small array and low bandwidth, so that
# modest shapes already need tiling, double buffering matters, and runs are fast.
TINY = NPUConfig(
    name="tiny",
    num_engines=1,
    local_sram_bytes=256 * KiB,
    shared_sram_bytes=512 * KiB,
    dram_bytes=64 * MiB,
    dram_bytes_per_cycle=16.0,
    shared_sram_bytes_per_cycle=64.0,
    host_bytes_per_cycle=8.0,
    dma_queues=4,
    dma_queue_bytes_per_cycle=8.0,
    dma_outstanding=2,
    dma_dram_latency=40,
    dma_sram_latency=8,
    dma_host_latency=200,
    mac_rows=8,
    mac_cols=8,
    mac_fill_drain=16,
    matmul_max_m=64,
    matmul_max_k=64,
    matmul_max_n=64,
    vector_lanes=16,
    vector_latency=4,
    sfu_lanes=8,
    sfu_latency=8,
    vector_max_elements=1 << 12,
)

PRESETS: dict[str, NPUConfig] = {"atom": ATOM, "tiny": TINY}


def get_preset(name: str | NPUConfig) -> NPUConfig:
    """Return the preset called ``name`` (an ``NPUConfig`` passes through)."""
    if isinstance(name, NPUConfig):
        return name
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown NPU preset {name!r}; known presets: {sorted(PRESETS)}") from None
