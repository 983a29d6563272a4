"""Compute units of one engine: matrix unit, vector unit, special-function unit.

Each ``check_*`` validates operands against the unit's limits and returns the instruction's
cost in cycles; each ``do_*`` computes the values (tile mode). Costs depend on shapes only,
so the same instruction stream costs the same in ``tile`` and ``fast`` mode.
"""

from __future__ import annotations

import math

import numpy as np

from .config import NPUConfig
from .errors import DTypeMismatchError, OperandShapeError
from .fixedmath import exp32_array, gelu_tanh32_array, tanh32_array

FLOAT_DTYPES = ("bf16", "fp32")

# Vector unit: elementwise binary ops (second operand a view broadcast over rows / columns,
# or a Python scalar), unary ops, and row reductions over the last axis.
VECTOR_BINARY = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.divide,
    "max": np.maximum,
    "min": np.minimum,
}
VECTOR_UNARY = {
    "copy": lambda x: x,
    "neg": np.negative,
    "abs": np.abs,
    "square": np.square,
}
REDUCE = {"sum": np.sum, "max": np.max, "min": np.min, "argmax": np.argmax}


# Special-function unit: func(src * scale + bias).
SFU = {
    "exp": exp32_array,
    "tanh": tanh32_array,
    "sigmoid": lambda x: 1.0 / (1.0 + exp32_array(-x)),
    "silu": lambda x: x / (1.0 + exp32_array(-x)),
    "gelu_tanh": gelu_tanh32_array,
    "rsqrt": lambda x: 1.0 / np.sqrt(x),
    "sqrt": np.sqrt,
    "reciprocal": lambda x: 1.0 / x,
    "log": np.log,
    "identity": lambda x: x,
}


def _limit(instr: str, what: str, value: int, limit: int, field: str):
    if value > limit:
        raise OperandShapeError(
            f"{instr}: {what} = {value} exceeds the unit's limit {limit} (NPUConfig.{field})"
        )


def check_matmul(cfg: NPUConfig, instr: str, dst, a, b) -> tuple[int, int]:
    """Validate ``dst (M, N) [+]= a (M, K) @ b (K, N)``; return (cycles, flops)."""
    for role, v in (("a", a), ("b", b), ("dst", dst)):
        if len(v.shape) != 2:
            raise OperandShapeError(f"{instr}: operand {role} {v.name!r} must be 2-D, got {v.shape}")
    (m, k), (k2, n) = a.shape, b.shape
    if k != k2 or dst.shape != (m, n):
        raise OperandShapeError(f"{instr}: shapes do not chain: a {a.shape} @ b {b.shape} -> dst {dst.shape}")
    if 0 in (m, k, n):
        raise OperandShapeError(f"{instr}: zero-size operand (M, K, N) = ({m}, {k}, {n})")
    _limit(instr, "M (rows of a)", m, cfg.matmul_max_m, "matmul_max_m")
    _limit(instr, "K (contraction)", k, cfg.matmul_max_k, "matmul_max_k")
    _limit(instr, "N (columns of b)", n, cfg.matmul_max_n, "matmul_max_n")
    if a.dtype != b.dtype or a.dtype not in FLOAT_DTYPES:
        raise DTypeMismatchError(
            f"{instr}: a {a.name!r} is {a.dtype} and b {b.name!r} is {b.dtype}; the matrix unit "
            f"multiplies two operands of one float dtype ({' or '.join(FLOAT_DTYPES)})"
        )
    if dst.dtype != "fp32":
        raise DTypeMismatchError(
            f"{instr}: accumulator {dst.name!r} is {dst.dtype}; the matrix unit accumulates in fp32"
        )
    passes = math.ceil(k / cfg.mac_rows) * math.ceil(n / cfg.mac_cols)
    # The array sustains matmul_efficiency of a row per cycle (NPUConfig.matmul_efficiency).
    cycles = cfg.mac_fill_drain + math.ceil(passes * max(m, cfg.mac_rows) / cfg.matmul_efficiency)
    return cycles, 2 * m * k * n


def do_matmul(a: np.ndarray, b: np.ndarray, acc: np.ndarray | None) -> np.ndarray:
    out = np.matmul(a, b, dtype=np.float32)
    return out if acc is None else acc + out


def _check_float(instr, *views):
    for v in views:
        if v.dtype not in FLOAT_DTYPES:
            raise DTypeMismatchError(
                f"{instr}: operand {v.name!r} is {v.dtype}; the vector unit and SFU compute on "
                f"{' and '.join(FLOAT_DTYPES)}"
            )


def _broadcastable(instr, role, v, shape):
    if len(v.shape) != len(shape) or any(s not in (1, t) for s, t in zip(v.shape, shape)):
        raise OperandShapeError(
            f"{instr}: operand {role} {v.name!r} of shape {v.shape} does not broadcast to {shape}"
        )


def check_vector(cfg: NPUConfig, instr: str, op: str, dst, a, b) -> int:
    if op not in VECTOR_BINARY and op not in VECTOR_UNARY:
        raise OperandShapeError(
            f"{instr}: unknown vector op {op!r}; ops: {sorted(VECTOR_BINARY) + sorted(VECTOR_UNARY)}"
        )
    if op in VECTOR_BINARY and b is None:
        raise OperandShapeError(f"{instr}: {op} needs a second operand")
    if op in VECTOR_UNARY and b is not None:
        raise OperandShapeError(f"{instr}: {op} takes one operand")
    if op == "copy" and dst.dtype == a.dtype == "int32":
        pass
    else:
        _check_float(instr, dst, a, *([b] if b is not None and not _is_scalar(b) else []))
    if a.shape != dst.shape:
        raise OperandShapeError(f"{instr}: a {a.name!r} {a.shape} differs from dst {dst.shape}")
    if b is not None and not _is_scalar(b):
        _broadcastable(instr, "b", b, dst.shape)
    return _elementwise_cost(cfg, instr, dst.size, cfg.vector_lanes, cfg.vector_latency)


def check_reduce(cfg: NPUConfig, instr: str, op: str, dst, src) -> int:
    if op not in REDUCE:
        raise OperandShapeError(f"{instr}: unknown reduction {op!r}; reductions: {sorted(REDUCE)}")
    if op == "argmax":
        _check_float(instr, src)
        if dst.dtype != "int32":
            raise DTypeMismatchError(f"{instr}: argmax writes int32 indices, dst {dst.name!r} is {dst.dtype}")
    else:
        _check_float(instr, dst, src)
    want = src.shape[:-1] + (1,)
    if not src.shape or dst.shape != want:
        raise OperandShapeError(
            f"{instr}: reducing {src.name!r} {src.shape} over its last axis needs dst of shape "
            f"{want}, got {dst.shape}"
        )
    return _elementwise_cost(cfg, instr, src.size, cfg.vector_lanes, cfg.vector_latency)


def check_activation(cfg: NPUConfig, instr: str, func: str, dst, src, bias) -> int:
    if func not in SFU:
        raise OperandShapeError(f"{instr}: unknown function {func!r}; the SFU has {sorted(SFU)}")
    _check_float(instr, dst, src)
    if src.shape != dst.shape:
        raise OperandShapeError(f"{instr}: src {src.name!r} {src.shape} differs from dst {dst.shape}")
    if bias is not None and not _is_scalar(bias):
        _check_float(instr, bias)
        _broadcastable(instr, "bias", bias, dst.shape)
    return _elementwise_cost(cfg, instr, dst.size, cfg.sfu_lanes, cfg.sfu_latency)


def _elementwise_cost(cfg, instr, n, lanes, latency) -> int:
    if n == 0:
        raise OperandShapeError(f"{instr}: zero-size operand")
    _limit(instr, "operand elements", n, cfg.vector_max_elements, "vector_max_elements")
    return latency + math.ceil(n / lanes)


def _is_scalar(x) -> bool:
    return isinstance(x, (int, float, np.floating, np.integer))


def do_vector(op, a, b):
    if op in VECTOR_UNARY:
        return VECTOR_UNARY[op](a)
    return VECTOR_BINARY[op](a, np.float32(b) if _is_scalar(b) else b)


def do_reduce(op, src):
    if op == "argmax":  # first index of the maximum, as np.argmax
        return np.argmax(src, axis=-1, keepdims=True).astype(np.int32)
    return REDUCE[op](src, axis=-1, keepdims=True)


def check_select(cfg: NPUConfig, instr: str, dst, src) -> int:
    _check_float(instr, dst, src)
    if len(src.shape) < 2 or src.shape != dst.shape:
        raise OperandShapeError(
            f"{instr}: select needs src and dst of one shape with at least 2 axes, got "
            f"{src.shape} -> {dst.shape}"
        )
    return _elementwise_cost(cfg, instr, dst.size, cfg.vector_lanes, cfg.vector_latency)


def do_select(src, offset, row_coef, col_coef, fill):
    """Keep src[..., i, j] where offset + row_coef * i + col_coef * j >= 0, else fill."""
    i = np.arange(src.shape[-2])[:, None]
    j = np.arange(src.shape[-1])[None, :]
    keep = offset + row_coef * i + col_coef * j >= 0
    return np.where(keep, src, np.float32(fill))


def do_activation(func, src, scale, bias):
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        x = src * np.float32(scale)
        if bias is not None:
            x = x + (np.float32(bias) if _is_scalar(bias) else bias)
        return SFU[func](x.astype(np.float32))
