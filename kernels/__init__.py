"""Tiled kernels for the emulated NPU, each with its NumPy reference beside it."""

from .matmul import matmul

__all__ = ["matmul"]
