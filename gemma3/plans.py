"""Saving and loading the kernels' planned schedules with a compiled model (JSON, no pickle).

A plan is what ``fast`` mode caches per static shape: the kernel's CycleReport (without its
per-instruction timeline) and its output specs. Loading them back means a compiled model runs
without tracing any kernel again.
"""

from __future__ import annotations

import json
import os

import npu_kernels
from npu_emulator import CycleReport, NPUConfig

PLANS = "plans.json"
REPORT_FIELDS = [
    "name",
    "npu",
    "clock_hz",
    "cycles",
    "unit_busy",
    "bytes_by_path",
    "peak_local_sram",
    "peak_shared_sram",
    "local_sram_bytes",
    "shared_sram_bytes",
    "instructions",
    "flops",
    "io_bytes",
    "peak_flops_per_cycle",
    "dram_bytes_per_cycle",
    "bounds",
]


def _thaw(frozen):
    """Frozen consts (sorted (key, value) pairs) -> a JSON-able dict."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in frozen}


def _refreeze(value):
    if isinstance(value, list):
        return tuple(_refreeze(v) for v in value)
    return value


def save_plans(npu, directory) -> str:
    entries = []
    for name, signature, consts, report, outputs in npu.plans():
        entries.append(
            {
                "kernel": name,
                "signature": [[list(shape), dtype] for shape, dtype in signature],
                "consts": _thaw(consts),
                "outputs": [[n, list(s), d] for n, s, d in outputs],
                "report": {f: getattr(report, f) for f in REPORT_FIELDS},
            }
        )
    path = os.path.join(directory, PLANS)
    with open(path, "w") as f:
        json.dump({"npu": npu.config.to_dict(), "plans": entries}, f)
    return path


def load_plans(npu, directory) -> int:
    path = os.path.join(directory, PLANS)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        doc = json.load(f)
    # As NPUConfig: a chip saved before a field existed has that field's default.
    try:
        same = NPUConfig.from_dict(doc.get("npu") or {}) == npu.config
    except (TypeError, ValueError):
        same = False
    if not same:
        raise ValueError(
            f"{path}: plans were made for another chip configuration; recompile with export=True"
        )
    registry = npu_kernels.registry()
    for e in doc["plans"]:
        if e["kernel"] not in registry:
            raise ValueError(f"{path}: unknown kernel {e['kernel']!r}")
        consts = {k: _refreeze(v) for k, v in e["consts"].items()}
        report = CycleReport(**e["report"])
        npu.add_plan(
            registry[e["kernel"]], [(tuple(s), d) for s, d in e["signature"]], consts, report, e["outputs"]
        )
    return len(doc["plans"])
