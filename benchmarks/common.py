"""Shared pieces of the benchmark scripts: one row per measured case, a table, --json."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOFLINE_FORMULA = (
    "roofline cycles = the largest per-unit bound: FLOPs / peak FLOPs per cycle, vector and SFU cycles / "
    "engines,\n  each DMA queue's bytes / queue bandwidth, compulsory DRAM bytes / DRAM bandwidth, shared-SRAM "
    "and host-link bytes / their bandwidth"
)


def chip(cfg) -> str:
    """One line describing the emulated chip: engines, peak compute, DRAM bandwidth."""
    return (
        f"{cfg.name}: {cfg.num_engines} engines, {cfg.peak_tflops:.1f} TFLOPS, "
        f"{cfg.dram_bytes_per_cycle * cfg.clock_hz / 1e9:.0f} GB/s DRAM"
    )


def row(name: str, report) -> dict:
    d = report.to_dict()
    return {
        "name": name,
        "cycles": d["cycles"],
        "emulated_us": d["emulated_us"],
        "flops": d["flops"],
        "dram_bytes": d["dram_bytes"],
        "roofline_cycles": d["roofline_cycles"],
        "pct_of_roofline": d["pct_of_roofline"],
        "binding_unit": d["binding_unit"],
        "unit_bounds": {u: round(b, 3) for u, b in d["unit_bounds"].items()},
        "utilisation": {k: round(v, 4) for k, v in d["utilisation"].items()},
    }


def print_rows(rows: list[dict], goal: float | None = None) -> None:
    head = (
        f"{'case':<34}{'cycles':>12}{'us':>10}{'GFLOP':>9}{'DRAM MB':>9}{'roofline':>11}{'%roof':>8}"
        f"  {'binding':<9}util matrix/vector/dma/dram"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        u = r["utilisation"]
        print(
            f"{r['name']:<34}{r['cycles']:>12,}{r['emulated_us']:>10.2f}{r['flops'] / 1e9:>9.3f}"
            f"{r['dram_bytes'] / 1e6:>9.2f}{r['roofline_cycles']:>11,.0f}{r['pct_of_roofline']:>8.1f}"
            f"  {r['binding_unit']:<9}{100 * u.get('matrix', 0):.0f}/{100 * u.get('vector', 0):.0f}/{100 * u.get('dma', 0):.0f}/{100 * u.get('dram', 0):.0f} %"
        )
    if goal is not None:
        below = [r for r in rows if r["pct_of_roofline"] < goal]
        print(f"\nrows below the {goal:.0f}% goal: {len(below)}")
        for r in below:
            print(f"  {r['name']}: {r['pct_of_roofline']:.1f}%")


def emit_json(obj: dict) -> None:
    print(json.dumps(obj))
