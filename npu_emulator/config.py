"""Hardware constants of the emulated NPU, and the named presets.

Every number a kernel may tile by or a cost formula uses lives here, in one frozen dataclass.
Kernels read tile sizes from the config (``k.config.mac_rows``), never from bare literals.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


# Fields where 0 means "none" (the ideal chip), and fractions of a peak (at most 1).
MAY_BE_ZERO = ("kernel_launch_cycles", "host_step_us")
FRACTIONS = ("dram_efficiency", "matmul_efficiency")


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
    # What a datasheet peak does not give (1.0 and 0: the ideal chip; the RBLN presets below
    # carry values fitted on published measurements). The roofline stays at the peaks.
    # Sustained fraction of the DRAM peak: GDDR6 / HBM lose cycles to refresh, bank conflicts
    # and read/write turnaround, so transfers share dram_bytes_per_cycle * dram_efficiency.
    dram_efficiency: float = 1.0
    # Sustained fraction of the matrix unit's row rate (operand delivery from SRAM, bubbles
    # between passes): a matmul's passes cost passes * max(M, mac_rows) / matmul_efficiency.
    matmul_efficiency: float = 1.0
    # Cycles added to every kernel: the command processor's dispatch of its program and the
    # engines' barrier at the kernel boundary (kernels run one after another).
    kernel_launch_cycles: int = 0
    # Host time per model call (a prefill chunk or a decode step) that the device does not
    # overlap: the runtime's input preparation, launch and output copy (microseconds).
    host_step_us: float = 0.0

    def __post_init__(self):
        for f in fields(self):
            if f.name == "name":
                continue
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"NPUConfig.{f.name} must be a number, got {value!r}")
            if f.name in MAY_BE_ZERO:
                if value < 0:
                    raise ValueError(f"NPUConfig.{f.name} must be >= 0, got {value}")
            elif value <= 0:
                raise ValueError(f"NPUConfig.{f.name} must be positive, got {value}")
        for name in FRACTIONS:
            if getattr(self, name) > 1:
                raise ValueError(
                    f"NPUConfig.{name} is a fraction of the peak, at most 1, got {getattr(self, name)}"
                )
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

# ---------------------------------------------------------------------------------------------
# The real RBLN devices. One preset is one RBLN device as the runtime sees it (one ATOM die; an
# ATOM-Max card shows four). Public sources:
# [arch]  docs.rbln.ai, software/profiler/architecture.html: ATOM has 4 MB local SRAM per neural
#         engine, 32 MB shared SRAM, 16 GB GDDR6, PCIe 5.0; Rebel100 is 4 chiplets as one device,
#         144 GB HBM3E, 4.8 TB/s.
# [cards] docs.rbln.ai, supports/version_matrix.html: ATOM = RBLN-CA02; ATOM+ = RBLN-CA12,
#         RBLN-CA22; ATOM-Max = RBLN-CA25.
# [paper] Rebellions' ATOM white paper and Hot Chips 2025 REBEL-Quad figures, as quoted in public
#         hardware notes (and ASCII.jp on REBEL-Quad): ATOM has 8 neural engines, FP16 32 TFLOPS,
#         INT8 128 TOPS, 16 GB GDDR6 at 256 GB/s, PCIe Gen5 x16; REBEL-Quad (Rebel100) has 4 dies
#         of 16 neural cores, 64 MB of SRAM spread over a die's cores plus 64 MB shared per die,
#         2,048 TFLOPS FP8.
# [max]   ATOM-Max (RBLN-CA25) card: 4 ATOM dies, 128 TFLOPS FP16, 64 GB GDDR6 at 1,024 GB/s
#         (public ATOM-Max notes); rebel-semin/rbln-skills
#         skills/rbln-compile-debug/references/constraints.md: "4 logical devices per card,
#         roughly 15.7 GiB per logical device". So one device = one ATOM die.
# The clock is not public: 1 GHz with a 64 x 32 MAC array per engine gives the 32 TFLOPS
# (8 * 2048 MAC * 2 FLOP * 1 GHz = 32.8), as in ``atom``. DMA latencies and queues are ``atom``'s.
#
# "fitted": on the ATOM-Max measurements of rebel-semin/rbln-skills
# skills/rbln-profile/references/interpretation.md, a Qwen3-1.7B text stack (Qwen3-ASR-1.7B)
# on one device, and on those points only: the decode step at batch 1 (15.88 ms p50, 15.7 ms
# device span; the LM head alone 2.64 ms) and the prefill of one 1024-token chunk (linear
# layers 140 ms, attention 17.5 ms). ``benchmarks/silicon.py`` reproduces them and holds the
# model against further published points that no constant was fitted on. The weights are
# costed as bf16 there: the LM head's 151936 x 2048 weights in 2.64 ms are 236 GB/s as bf16 but
# 472 GB/s, past the 256 GB/s peak, as the fp32 the source assumed. All four ATOM presets carry
# the fitted values: they are one die.
ATOM_DIE = dict(
    num_engines=8,  # [paper]
    local_sram_bytes=4 * MiB,  # [arch]
    shared_sram_bytes=32 * MiB,  # [arch]
    dram_bytes=16 * GiB,  # [arch]
    dram_bytes_per_cycle=256.0,  # [paper] 256 GB/s GDDR6 at the 1 GHz clock
    host_bytes_per_cycle=64.0,  # [arch] PCIe 5.0 x16: about 64 GB/s each way
    # fitted: the LM head, one kernel streaming 0.62 GB of bf16 weights: 2.444 ms at the peak
    # on this preset, 2.64 ms measured -> 2.444 / 2.64 = 0.926 of the peak sustained
    dram_efficiency=0.926,
    # fitted: the prefill chunk's linear layers are compute-bound; 88.7 ms at the peak on this
    # preset, 140 ms measured (20.6 of 32.8 TFLOPS) -> 0.632
    matmul_efficiency=0.632,
    # fitted: the prefill chunk's attention, 17.5 ms measured; the softmax's exp on the SFU
    # bounds it at 2 elements per cycle per engine (32, ``atom``'s choice, gives 6.2 ms). The
    # RBLN kernel may also compute masked key tiles, which ours skips; this rate absorbs that.
    sfu_lanes=2,
    # fitted: the decode step's 15.7 ms device span against 15.34 ms of its kernels at the
    # fitted DRAM rate: 0.36 ms over its 395 kernels -> 1,000 cycles (about 0.9 us) per kernel
    kernel_launch_cycles=1000,
    # fitted: 15.88 ms p50 per decode step against the 15.7 ms device span (optimum-rbln's host
    # work per call, the runtime's launch and output copy) -> 180 us per call
    host_step_us=180.0,
)
RBLN_CA02 = NPUConfig(name="rbln-ca02", **ATOM_DIE)  # ATOM [cards]
RBLN_CA12 = NPUConfig(name="rbln-ca12", **ATOM_DIE)  # ATOM+ [cards]: the ATOM die, same figures
RBLN_CA22 = NPUConfig(name="rbln-ca22", **ATOM_DIE)  # ATOM+ [cards]
RBLN_CA25 = NPUConfig(name="rbln-ca25", **ATOM_DIE)  # ATOM-Max [cards], one of its 4 dies [max]

# Rebel100 (REBEL-Quad, RBLN-CR03): 4 chiplets working as one device [arch]. 16 neural cores per
# die [paper], so 64 engines; 64 MB L1 per die over 16 cores = 4 MiB each, 64 MB shared per die
# = 256 MiB [paper]; 144 GB HBM3E at 4.8 TB/s [arch]. FP16 rate: not public; half the 2,048
# TFLOPS FP8 [paper] is assumed, 1,024 TFLOPS = 64 engines * (128 x 64) MAC * 2 FLOP * 1 GHz
# (1,048.6). DMA queues sized so that they can saturate the 4.8 TB/s. No public measurement of
# a decoder on Rebel100 was found: its sustained-rate constants stay ideal (1.0, 0).
REBEL100 = NPUConfig(
    name="rebel100",
    num_engines=64,
    local_sram_bytes=4 * MiB,
    shared_sram_bytes=256 * MiB,
    dram_bytes=144 * 10**9 // GiB * GiB,  # 144 GB, in whole GiB
    dram_bytes_per_cycle=4800.0,
    shared_sram_bytes_per_cycle=8192.0,
    host_bytes_per_cycle=64.0,  # PCIe Gen5 x16
    dma_queues=64,
    dma_queue_bytes_per_cycle=128.0,
    mac_rows=128,
    mac_cols=64,
)

PRESETS: dict[str, NPUConfig] = {
    "atom": ATOM,
    "tiny": TINY,
    "rbln-ca02": RBLN_CA02,
    "rbln-ca12": RBLN_CA12,
    "rbln-ca22": RBLN_CA22,
    "rbln-ca25": RBLN_CA25,
    "rebel100": REBEL100,
}

# optimum-rbln's ``rbln_config.npu`` names (the product card names ``rebel.get_npu_name()``
# returns, e.g. "RBLN-CA25") -> presets. RBLN-CR03 is the Rebel100 card in Rebellions' device
# plugin and torch-rbln (family "rebel").
RBLN_NPU_NAMES: dict[str, str] = {
    "RBLN-CA02": "rbln-ca02",
    "RBLN-CA12": "rbln-ca12",
    "RBLN-CA15": "rbln-ca12",  # the CA12's chip in another form factor (optimum-rbln's normalize_npu)
    "RBLN-CA22": "rbln-ca22",
    "RBLN-CA25": "rbln-ca25",
    "RBLN-CR03": "rebel100",
}


def preset_for_rbln_npu(npu: str) -> NPUConfig:
    """The preset of an optimum-rbln NPU name ("RBLN-CA25", any case)."""
    key = npu.strip().upper() if isinstance(npu, str) else npu
    if key not in RBLN_NPU_NAMES:
        raise ValueError(f"unknown RBLN NPU name {npu!r}; known: {sorted(RBLN_NPU_NAMES)}")
    return PRESETS[RBLN_NPU_NAMES[key]]


def get_preset(name: str | NPUConfig) -> NPUConfig:
    """Return the preset called ``name`` (an ``NPUConfig`` passes through)."""
    if isinstance(name, NPUConfig):
        return name
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown NPU preset {name!r}; known presets: {sorted(PRESETS)}") from None


# ---------------------------------------------------------------------------------------------
# Links between devices (npu_emulator/group.py): what a device group's transfers cost.
TOPOLOGIES = ("ring", "switch")


@dataclass(frozen=True)
class LinkConfig:
    name: str = "custom-link"
    # "switch": every device has one full-duplex port to a switch (a PCIe switch or root
    # complex), any device reaches any other, a transfer uses its source's egress and its
    # destination's ingress port. "ring": device i is wired to i - 1 and i + 1 (mod N) by
    # full-duplex links, and only neighbours exchange data.
    topology: str = "switch"
    # Bandwidth of one port or link, each direction (bytes per cycle of the chips' clock).
    bytes_per_cycle: float = 63.0
    # Fixed cost of one transfer before its first byte lands (cycles): descriptor, doorbell,
    # the switch traversal and the completion the receiver waits for.
    latency_cycles: int = 1500

    def __post_init__(self):
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"LinkConfig.topology must be one of {TOPOLOGIES}, got {self.topology!r}")
        for name in ("bytes_per_cycle", "latency_cycles"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LinkConfig.{name} must be a positive number, got {value!r}")

    def replace(self, **changes) -> LinkConfig:
        return replace(self, **changes)


# ATOM cards talk device to device over PCIe Gen5 x16 through the host's PCIe switch or root
# complex ([arch]: ATOM's PCIe 5.0 interface; multi-device models run over it with Rebellions
# Scalable Design, whose profiler shows "Device HDMA" and "Device Sync" commands). PCIe 5.0:
# 32 GT/s per lane, 128b/130b encoding, 3.94 GB/s per lane, 63.0 GB/s per direction at x16
# (PCI-SIG's figures as tabulated in hpc-notes.pages.dev/reference/pcie): 63 B/cycle at 1 GHz.
# Peer-to-peer writes measured on other Gen5 x16 cards through Broadcom PEX890xx switches reach
# 53-56 GB/s of the 63 (voipmonitor/rtx6kpro, hardware/pcie-bandwidth.md): the fitted RBLN
# presets take 56 GB/s as what a link sustains, the datasheet chip the 63.
# The per-transfer latency is not public for ATOM: 1.5 us is our assumption (a P2P DMA
# descriptor, the switch hop and the flag the receiver polls; GPUs over PCIe see a few us).
PCIE5_X16 = LinkConfig(name="pcie5-x16", topology="switch", bytes_per_cycle=63.0, latency_cycles=1500)
PCIE5_X16_SUSTAINED = PCIE5_X16.replace(name="pcie5-x16-sustained", bytes_per_cycle=56.0)
# For tests: a slow ring between TINY chips (a quarter of TINY's DRAM rate, so a transfer never
# waits for DRAM), with a short latency.
TINY_LINK = LinkConfig(name="tiny-ring", topology="ring", bytes_per_cycle=4.0, latency_cycles=100)

LINK_PRESETS: dict[str, LinkConfig] = {
    "pcie5-x16": PCIE5_X16,
    "pcie5-x16-sustained": PCIE5_X16_SUSTAINED,
    "tiny-ring": TINY_LINK,
}

# The link a chip preset's devices are joined by when a group names none. Rebel100 cards are
# PCIe Gen5 x16 too ([arch]); between its 4 chiplets the UCIe links are inside the one device.
DEVICE_LINKS: dict[str, LinkConfig] = {
    "atom": PCIE5_X16,
    "tiny": TINY_LINK,
    "rbln-ca02": PCIE5_X16_SUSTAINED,
    "rbln-ca12": PCIE5_X16_SUSTAINED,
    "rbln-ca22": PCIE5_X16_SUSTAINED,
    "rbln-ca25": PCIE5_X16_SUSTAINED,
    "rebel100": PCIE5_X16_SUSTAINED,
}


def get_link(link: str | LinkConfig | None, config: NPUConfig) -> LinkConfig:
    """The link ``link`` names (a ``LinkConfig`` passes through), or the default of ``config``'s
    preset (``PCIE5_X16`` for a chip of no preset)."""
    if isinstance(link, LinkConfig):
        return link
    if link is None:
        return DEVICE_LINKS.get(config.name, PCIE5_X16)
    try:
        return LINK_PRESETS[link]
    except KeyError:
        raise ValueError(f"unknown link preset {link!r}; known: {sorted(LINK_PRESETS)}") from None
