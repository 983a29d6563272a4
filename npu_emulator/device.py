"""The NPU: wires config, memories, the kernel context and the scheduler together.

    npu = NPU("atom", mode="tile")            # or mode="fast" (default)
    out, report = npu.run(kernel, a, b)       # NumPy in, NumPy out, plus a CycleReport

``tile`` mode executes every instruction of the kernel with every check and schedules the
stream it recorded. ``fast`` mode traces the kernel once per static shape (no values), schedules
that stream and caches the report; every call then runs only the kernel's whole-operator
``fast`` function. Both schedule the same instruction stream, so their cycles agree exactly.
The fast-mode trace tracks written regions as tile mode does: an output left unwritten or a read
of SRAM / DRAM scratch no earlier instruction wrote raises the same error, once per shape.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .config import NPUConfig, get_preset
from .errors import EmulatorError, KernelError
from .memory import BF16, DRAM, DTYPES, Allocator, Buffer, check_dtype, itemsize, store_value
from .program import KernelContext
from .report import CycleReport, unit_bounds
from .timing import schedule

MODES = ("tile", "fast")
NUMERICS = ("fp32", "bf16")


@dataclass(frozen=True)
class TensorSpec:
    """A DRAM input as an autotuner sees it: the ``emit`` parameter's name, shape and dtype."""

    name: str
    shape: tuple
    dtype: str


@dataclass(frozen=True)
class Kernel:
    """A tiled program plus its whole-operator twin.

    emit(k, *inputs, **consts): issue the tiled program on ``k`` (a ``KernelContext``); the
        inputs are DRAM ``Buffer``s named after emit's parameters; return the output buffer(s)
        made with ``k.output``.
    fast(*arrays, **consts): the same math on whole NumPy arrays (fast mode); returns the
        outputs, or None for a kernel that only updates inputs in place (a KV-cache write):
        it then updates the arrays it was given, as the tiled program writes the DRAM tensors.
        A fast function with a ``numerics`` parameter is called with the NPU's numerics
        (``"bf16"``, or ``"fp32"``; ``"fp32"`` too when the device dtype is fp32), so that it
        rounds an intermediate the tiled program passes through a device-dtype tile as the
        device does (``npu_emulator.as_stored``) and matches tile mode under both numerics.
    reference(*arrays, **consts): the plain NumPy definition tests compare against.
    autotune(config, *specs, **consts) -> candidates: optional; ``specs`` are the inputs'
        ``TensorSpec``s, each candidate a dict of extra keyword arguments for ``emit`` (tile
        sizes, a plan object). The NPU traces and schedules every candidate once per chip,
        device dtype, input shapes and consts, keeps the one with the fewest cycles (the first
        on ties) and passes it to ``emit`` in both modes; ``fast`` never sees it.
    """

    name: str
    emit: Callable
    fast: Callable
    reference: Callable | None = None
    autotune: Callable | None = None
    # (config, dtype, input specs, frozen consts) -> chosen candidate; see ``tune``.
    _tuned: dict = field(default_factory=dict, init=False, compare=False, hash=False, repr=False)

    def __post_init__(self):
        params = _parameters(self.fast)
        object.__setattr__(self, "_fast_numerics", params is not None and "numerics" in params)
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        emit_params = list((_parameters(self.emit) or {}).values())[1:]  # after the context
        object.__setattr__(self, "_input_names", [p.name for p in emit_params if p.kind in kinds])
        if self.__doc__ is type(self).__doc__:
            module = inspect.getmodule(self.emit)
            if module is not None and module.__doc__:
                # help(npu_kernels.softmax) then shows the module's docstring (IO layouts,
                # constants, SRAM, FLOPs) rather than this class's.
                doc = f"Kernel {self.name!r} of {module.__name__}.\n\n{module.__doc__}"
                object.__setattr__(self, "__doc__", doc)

    def input_names(self, count: int) -> list[str]:
        """Names of the first ``count`` DRAM inputs: emit's parameters after the context
        (``in{i}`` past them, e.g. for ``*inputs``)."""
        names = self._input_names
        return [names[i] if i < len(names) else f"in{i}" for i in range(count)]

    def tune(self, config: NPUConfig, specs, consts: dict, dtype: str = "bf16") -> dict:
        """The autotuned candidate for inputs ``specs`` (``TensorSpec``s) and ``consts`` on
        ``config`` ({} without ``autotune``), chosen once and cached on the kernel."""
        if self.autotune is None:
            return {}
        specs = tuple(TensorSpec(s.name, tuple(s.shape), s.dtype) for s in specs)
        key = (config, dtype, tuple((s.shape, s.dtype) for s in specs), _freeze(consts))
        chosen = self._tuned.get(key)
        if chosen is None:
            chosen = self._choose(config, specs, consts, dtype)
            self._tuned[key] = chosen
        return chosen

    def _choose(self, config, specs, consts, dtype) -> dict:
        best, failures = None, []
        candidates = list(self.autotune(config, *specs, **consts))
        for cand in candidates:
            k = KernelContext(f"{self.name}-tune", config, execute=False, dtype=dtype)
            shells = [Buffer(s.name, DRAM, s.shape, s.dtype, 0, 0) for s in specs]
            try:
                self.emit(k, *shells, **{**cand, **consts})  # consts the caller fixed win
                cycles = schedule(k.stream(), config).total
            except EmulatorError as e:  # a candidate that does not fit is no candidate
                failures.append(f"  {cand}: {type(e).__name__}: {e}")
                continue
            finally:
                k.release_all()
            if best is None or cycles < best[0]:
                best = (cycles, cand)
        if best is None:
            detail = "\n".join(failures) or "  (the autotuner returned no candidates)"
            raise KernelError(
                f"kernel {self.name!r}: no autotune candidate runs on {config.name} for inputs "
                f"{[(s.name, s.shape, s.dtype) for s in specs]}:\n{detail}"
            )
        return dict(best[1])


def _parameters(fn):
    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or jitted callable without a signature
        return None


class DeviceTensor:
    """A tensor resident in the NPU's DRAM (weights, KV caches): upload once, reuse."""

    def __init__(self, npu: NPU, buffer: Buffer):
        self.npu = npu
        self.buffer = buffer

    @property
    def shape(self):
        return self.buffer.shape

    @property
    def dtype(self):
        return self.buffer.dtype

    def numpy(self) -> np.ndarray:
        return self.buffer.data

    def __repr__(self):
        return f"DeviceTensor({self.buffer.name!r}, shape={self.shape}, dtype={self.dtype})"


@dataclass
class _Plan:
    report: CycleReport
    outputs: list[tuple[str, tuple, str]]  # (name, shape, dtype)


class NPU:
    def __init__(
        self,
        config: str | NPUConfig = "atom",
        *,
        mode: str = "fast",
        numerics: str = "bf16",
        dtype: str = "bf16",
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {NUMERICS}, got {numerics!r}")
        self.config = get_preset(config)
        self.mode = mode
        self.numerics = numerics
        self.dtype = check_dtype(dtype)
        self.dram = Allocator(DRAM, self.config.dram_bytes, self.config.dram_alignment, "DRAM")
        self._plans: dict = {}
        self.last_report: CycleReport | None = None

    def __repr__(self):
        return f"NPU({self.config.name!r}, mode={self.mode!r}, numerics={self.numerics!r})"

    # ------------------------------------------------------------------ DRAM

    def to_device(
        self,
        array,
        dtype: str | None = None,
        *,
        name: str = "tensor",
        compact: bool = False,
        column_major: bool = False,
        copy: bool = True,
    ) -> DeviceTensor:
        """Copy a host array into DRAM as ``dtype`` (default: int32 for integers, else the
        device dtype); bf16 numerics round the values on the way in.

        How the host holds the values (never what the chip costs): ``compact`` keeps a bf16
        tensor's values in 2 bytes each (``ml_dtypes.bfloat16``) where that is exact (fast
        mode under bf16 numerics; else fp32 as usual); ``column_major`` keeps a 2-D tensor
        as the transposed view of a C-ordered array (products with few rows then read each
        output's column contiguously, see npu_kernels/hostmath.py). ``copy=False`` takes
        ``array`` as the data when it already is what would be stored (e.g. a view of
        another weight: the tied embedding read as the LM head)."""
        array = np.asarray(array)
        if dtype is None:
            dtype = "int32" if np.issubdtype(array.dtype, np.integer) else self.dtype
        check_dtype(dtype)
        address, size = self.dram.allocate(name, array.shape, dtype)
        try:
            data = self._host_copy(array, dtype, compact, column_major, copy)
        except BaseException:
            self.dram.release(address, size)
            raise
        buf = Buffer(name, DRAM, array.shape, dtype, address, size, data=data)
        return DeviceTensor(self, buf)

    def _host_copy(self, array, dtype, compact, column_major, copy):
        if compact and self.mode == "fast" and dtype == "bf16" and self.numerics == "bf16":
            host_dtype = BF16  # bf16 numerics: the values are bf16 anyway, exactly
            values = array
        else:
            host_dtype = np.dtype(DTYPES[dtype][1])
            values = (
                array if array.dtype == host_dtype and not copy else store_value(array, dtype, self.numerics)
            )
        column_major = column_major and array.ndim == 2
        stored = values.dtype == host_dtype and (
            values.T.flags.c_contiguous if column_major else values.flags.c_contiguous
        )
        if stored and (not copy or not np.may_share_memory(values, array)):
            return values  # the caller's view (copy=False), or already a fresh array (rounded)
        # A copy: the device owns its DRAM (the host array may change or be reused).
        if column_major:
            return np.array(values.T, dtype=host_dtype, order="C", copy=True).T
        return np.array(values, dtype=host_dtype, order="C", copy=True)

    def free(self, tensor: DeviceTensor) -> None:
        buf = tensor.buffer
        if buf.freed:
            raise KernelError(f"free {buf.name!r}: already freed")
        self.dram.release(buf.address, buf.nbytes)
        buf.freed = True

    # ------------------------------------------------------------------ runs

    def run(self, kernel: Kernel, *inputs, trace=None, **consts):
        """Run ``kernel`` on ``inputs`` (NumPy arrays or DeviceTensors).

        Returns ``(outputs, report)``: one NumPy array (or a tuple of them) and the
        ``CycleReport``. ``trace`` names a Chrome-trace JSON file to write.
        """
        temps, tensors = [], []
        names = kernel.input_names(len(inputs))
        for i, x in enumerate(inputs):
            if isinstance(x, DeviceTensor):
                if x.npu is not self:
                    raise KernelError(f"{kernel.name}: input {i} lives on another NPU")
                tensors.append(x)
            else:
                t = self.to_device(x, name=names[i])
                temps.append(t)
                tensors.append(t)
        try:
            if self.mode == "tile":
                outputs, report = self._run_tile(kernel, tensors, consts)
            else:
                outputs, report = self._run_fast(kernel, tensors, consts)
        finally:
            for t in temps:
                self.free(t)
        if trace is not None:
            report.write_trace(trace)
        self.last_report = report
        return (outputs[0] if len(outputs) == 1 else tuple(outputs)), report

    def _context(self, kernel: Kernel, execute: bool) -> KernelContext:
        return KernelContext(
            kernel.name,
            self.config,
            execute=execute,
            numerics=self.numerics,
            dtype=self.dtype,
            dram=self.dram,
            verify=True,
        )

    def _emit(self, kernel, tensors, consts, execute):
        k = self._context(kernel, execute)
        bufs = []
        for t in tensors:
            b = t.buffer
            # A fresh handle per run: dependency tracking starts clean; values are shared.
            h = Buffer(b.name, DRAM, b.shape, b.dtype, b.address, b.nbytes, data=b.data if execute else None)
            if execute:
                h.written = np.ones(b.shape, np.bool_)
            bufs.append(h)
        chosen = kernel.tune(self.config, bufs, consts, self.dtype)
        try:
            returned = kernel.emit(k, *bufs, **{**chosen, **consts})
            returned = list(returned) if isinstance(returned, (tuple, list)) else [returned]
            if [id(b) for b in returned] != [id(b) for b in k.outputs]:
                raise KernelError(
                    f"kernel {kernel.name!r} must return exactly the buffers it made with "
                    f"k.output, in order ({len(k.outputs)} made, {len(returned)} returned)"
                )
            k.check_outputs_written()
            stream = k.stream()
            sched = schedule(stream, self.config)
        finally:
            k.release_all()
        io_bytes = k.roofline_bytes
        if io_bytes is None:
            io_bytes = sum(math.prod(b.shape) * itemsize(b.dtype) for b in bufs + k.outputs)
        counts: dict[str, int] = {}
        for op in stream.ops:
            counts[op] = counts.get(op, 0) + 1
        report = CycleReport(
            name=kernel.name,
            npu=self.config.name,
            clock_hz=self.config.clock_hz,
            # The dispatch and barrier every kernel pays (NPUConfig.kernel_launch_cycles).
            cycles=math.ceil(sched.total - 1e-9) + self.config.kernel_launch_cycles,
            unit_busy={u: int(round(b)) for u, b in zip(stream.unit_names, sched.busy)},
            bytes_by_path=dict(stream.bytes_by_path),
            peak_local_sram=k.peak_local,
            peak_shared_sram=k.peak_shared,
            local_sram_bytes=self.config.local_sram_bytes,
            shared_sram_bytes=self.config.shared_sram_bytes,
            instructions=counts,
            flops=stream.flops,
            io_bytes=io_bytes,
            peak_flops_per_cycle=self.config.peak_flops_per_cycle,
            dram_bytes_per_cycle=self.config.dram_bytes_per_cycle,
            bounds=unit_bounds(stream, self.config, stream.flops, io_bytes),
            schedule=sched,
            stream=stream,
        )
        return k, report

    def _run_tile(self, kernel, tensors, consts):
        k, report = self._emit(kernel, tensors, consts, execute=True)
        return [b.data for b in k.outputs], report

    def plan(self, kernel: Kernel, signature, consts) -> _Plan:
        """The cached schedule of ``kernel`` for input (shape, dtype) ``signature``."""
        key = (kernel.name, kernel.emit, tuple(signature), _freeze(consts))
        plan = self._plans.get(key)
        if plan is None:
            shells = []
            for name, (shape, dtype) in zip(kernel.input_names(len(signature)), signature):
                shells.append(DeviceTensor(self, Buffer(name, DRAM, shape, dtype, 0, 0)))
            k, report = self._emit(kernel, shells, consts, execute=False)
            plan = _Plan(report, [(b.name, b.shape, b.dtype) for b in k.outputs])
            self._plans[key] = plan
        return plan

    def plans(self):
        """The cached plans: (kernel name, input signature, consts, report, output specs)."""
        for (name, _, signature, consts), plan in self._plans.items():
            yield name, signature, consts, plan.report, plan.outputs

    def add_plan(self, kernel: Kernel, signature, consts: dict, report: CycleReport, outputs) -> None:
        """Install a plan made earlier (e.g. saved with a compiled model): no tracing needed."""
        key = (kernel.name, kernel.emit, tuple((tuple(s), d) for s, d in signature), _freeze(consts))
        self._plans[key] = _Plan(report, [(n, tuple(s), d) for n, s, d in outputs])

    def _run_fast(self, kernel, tensors, consts):
        plan = self.plan(kernel, [(t.shape, t.dtype) for t in tensors], consts)
        if kernel._fast_numerics:
            # How the kernel's device-dtype tiles hold values: rounded only when they are bf16.
            numerics = self.numerics if self.dtype == "bf16" else "fp32"
            results = kernel.fast(*(t.buffer.data for t in tensors), numerics=numerics, **consts)
        else:
            results = kernel.fast(*(t.buffer.data for t in tensors), **consts)
        if results is None:  # a kernel that only updates its inputs in place
            results = []
        results = list(results) if isinstance(results, (tuple, list)) else [results]
        if len(results) != len(plan.outputs):
            raise KernelError(
                f"kernel {kernel.name!r}: fast returned {len(results)} outputs, emit made {len(plan.outputs)}"
            )
        outputs = []
        for r, (name, shape, dtype) in zip(results, plan.outputs):
            r = np.asarray(r)
            if r.shape != shape:
                raise KernelError(
                    f"kernel {kernel.name!r}: fast output {name!r} has shape {r.shape}, the tiled "
                    f"program's has {shape}"
                )
            outputs.append(store_value(r, dtype, self.numerics).astype(DTYPES[dtype][1], copy=False))
        return outputs, plan.report


def _freeze(x):
    if isinstance(x, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(v) for v in x)
    return x
