"""A reference NPU emulator: SRAM, DMA, matrix and vector units, cycles and traces.

The public API: ``NPU`` runs a ``Kernel`` (a tiled program written against
``KernelContext``) in ``tile`` or ``fast`` mode and returns outputs with a ``CycleReport``.
"""

from .config import (
    ATOM,
    LINK_PRESETS,
    PRESETS,
    RBLN_NPU_NAMES,
    TINY,
    LinkConfig,
    NPUConfig,
    get_link,
    get_preset,
    preset_for_rbln_npu,
)
from .device import NPU, DeviceTensor, Kernel, TensorSpec
from .errors import (
    AllocationError,
    DTypeMismatchError,
    EmulatorError,
    KernelError,
    OperandShapeError,
    OutOfBoundsError,
    UninitializedReadError,
)
from .group import DeviceGroup, GroupKernel, GroupReport
from .memory import Buffer, View, as_stored, round_bf16
from .program import InstructionStream, KernelContext, ceil_div, tiles
from .report import CycleReport

__all__ = [
    "ATOM",
    "PRESETS",
    "TINY",
    "NPUConfig",
    "get_preset",
    "RBLN_NPU_NAMES",
    "preset_for_rbln_npu",
    "NPU",
    "DeviceTensor",
    "Kernel",
    "TensorSpec",
    "AllocationError",
    "DTypeMismatchError",
    "EmulatorError",
    "KernelError",
    "OperandShapeError",
    "OutOfBoundsError",
    "UninitializedReadError",
    "Buffer",
    "View",
    "round_bf16",
    "as_stored",
    "InstructionStream",
    "KernelContext",
    "ceil_div",
    "tiles",
    "CycleReport",
    "LinkConfig",
    "LINK_PRESETS",
    "get_link",
    "DeviceGroup",
    "GroupKernel",
    "GroupReport",
]
