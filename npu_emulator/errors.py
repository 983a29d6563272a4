"""Exceptions of the emulator. Each message names the buffer or instruction and the numbers."""


class EmulatorError(Exception):
    """Base class of every error the emulated NPU raises."""


class AllocationError(EmulatorError):
    """A buffer does not fit in the memory it was asked from (SRAM or DRAM)."""


class OutOfBoundsError(EmulatorError):
    """A region (DMA descriptor or operand view) reaches outside its buffer."""


class OperandShapeError(EmulatorError):
    """An operand's shape is wrong for the instruction or beyond the unit's limit."""


class DTypeMismatchError(EmulatorError):
    """Operands of one instruction have dtypes the unit cannot combine."""


class UninitializedReadError(EmulatorError):
    """In tile mode, an instruction read SRAM that no instruction had written."""


class KernelError(EmulatorError):
    """A kernel broke the contract with the device (outputs, placement, freed buffers)."""
