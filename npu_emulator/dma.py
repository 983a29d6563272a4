"""DMA descriptors: validation and cost.

A descriptor copies a strided region of 1 to 3 dimensions from one memory to another, byte for
byte: source and destination must have the same shape and dtype (a DMA does not convert).
Its cost is ``latency + bytes / rate``, where the latency is that of the slowest memory it
touches and the rate is the queue's bandwidth, further split with every other transfer in
flight on the same shared resource (DRAM, shared SRAM ports, host link): see ``timing.py``.
"""

from __future__ import annotations

from .config import NPUConfig
from .errors import DTypeMismatchError, KernelError, OperandShapeError
from .memory import DRAM, HOST, LOCAL, SHARED

# Shared resources a transfer may use; bit flags so the scheduler can test them quickly.
RES_DRAM, RES_SHARED, RES_HOST = 1, 2, 4

ALLOWED = {
    (HOST, DRAM),
    (DRAM, HOST),
    (DRAM, LOCAL),
    (LOCAL, DRAM),
    (DRAM, SHARED),
    (SHARED, DRAM),
    (SHARED, LOCAL),
    (LOCAL, SHARED),
    (LOCAL, LOCAL),
    (SHARED, SHARED),
    (DRAM, DRAM),
}


def route(cfg: NPUConfig, instr: str, src_memory: str, dst_memory: str) -> tuple[int, int]:
    """Latency and shared-resource flags of a transfer between two memories."""
    if (src_memory, dst_memory) not in ALLOWED:
        names = {HOST: "host memory", DRAM: "DRAM", SHARED: "shared SRAM", LOCAL: "local SRAM"}
        raise KernelError(
            f"{instr}: no DMA path from {names[src_memory]} to {names[dst_memory]} "
            "(host memory reaches SRAM only through DRAM)"
        )
    levels = {src_memory, dst_memory}
    res = (RES_DRAM if DRAM in levels else 0) | (RES_SHARED if SHARED in levels else 0)
    res |= RES_HOST if HOST in levels else 0
    if HOST in levels:
        latency = cfg.dma_host_latency
    elif DRAM in levels:
        latency = cfg.dma_dram_latency
    else:
        latency = cfg.dma_sram_latency
    return latency, res


def check_dma(cfg: NPUConfig, instr: str, dst, src) -> tuple[int, int, int]:
    """Validate a descriptor; return (latency cycles, bytes, resource flags)."""
    latency, res = route(cfg, instr, src.buffer.memory, dst.buffer.memory)
    if src.shape != dst.shape:
        raise OperandShapeError(
            f"{instr}: source {src.name!r} region {src.shape} and destination {dst.name!r} "
            f"region {dst.shape} differ in shape"
        )
    if not 1 <= len(src.shape) <= 3:
        raise OperandShapeError(
            f"{instr}: a descriptor moves a 1-D to 3-D region, got rank {len(src.shape)} "
            f"{src.shape}; split it into several descriptors"
        )
    if src.size == 0:
        raise OperandShapeError(f"{instr}: zero-size region {src.shape}")
    if src.size > cfg.dma_max_elements:
        raise OperandShapeError(
            f"{instr}: region of {src.size} elements exceeds the descriptor limit "
            f"{cfg.dma_max_elements} (NPUConfig.dma_max_elements)"
        )
    if src.dtype != dst.dtype:
        raise DTypeMismatchError(
            f"{instr}: source {src.name!r} is {src.dtype} but destination {dst.name!r} is "
            f"{dst.dtype}; a DMA copies bytes and does not convert (cast on the vector unit)"
        )
    return latency, src.nbytes, res
