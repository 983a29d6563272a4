"""How fast the emulator itself runs on this host.

    python benchmarks/emulator_speed.py [--json]

* scheduler: instructions per wall-second of the Numba event loop, on the instruction
  streams of Gemma3-sized matmuls (goal: >= 1,000,000);
* tracing: instructions per wall-second of recording a kernel's stream in Python (paid once
  per static shape in fast mode, every call in tile mode);
* fast mode: emulated cycles per wall-second of ``NPU.run`` with the schedule cached, the
  host doing the math with NumPy (goal: >= 1e8 for a Gemma3-sized matmul; cycle-level
  simulators run at about 1e3 to 3e5);
* tile mode: the same for a kernel executed instruction by instruction, with every check.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import chip, emit_json

from npu_emulator import NPU
from npu_emulator.timing import schedule
from npu_kernels.matmul import matmul

CASES = [(1, 2560, 10240), (256, 2560, 10240), (1, 640, 262144)]


def best_of(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--npu", default="atom")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    npu = NPU(args.npu, mode="fast")
    cfg = npu.config
    rng = np.random.default_rng(0)
    rows = []
    total_instr = total_sched = 0.0
    print(f"emulator speed on {cfg.name}\n")
    print(
        f"{'case':<24}{'instr':>8}{'sched instr/s':>15}{'trace instr/s':>15}{'cycles':>12}{'fast cycles/s':>15}{'fast ms':>9}"
    )
    for m, k, n in CASES:
        sig = [((m, k), "bf16"), ((k, n), "bf16")]
        matmul_tiling_warm = npu.plan(matmul, sig, {})  # autotune + first trace, not timed
        report = matmul_tiling_warm.report
        stream = report.stream
        t_sched = best_of(lambda stream=stream: schedule(stream, cfg))
        fresh = NPU(cfg)
        t_trace = best_of(
            lambda fresh=fresh, sig=sig: (fresh._plans.clear(), fresh.plan(matmul, sig, {})), repeat=1
        )
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = npu.to_device(rng.standard_normal((k, n), dtype=np.float32), name="weights")
        t_fast = best_of(lambda a=a, b=b: npu.run(matmul, a, b))
        npu.free(b)
        r = {
            "name": f"matmul M={m} K={k} N={n}",
            "instructions": len(stream),
            "cycles": report.cycles,
            "scheduler_instructions_per_second": len(stream) / t_sched,
            "trace_instructions_per_second": len(stream) / t_trace,
            "fast_run_seconds": t_fast,
            "emulated_cycles_per_second": report.cycles / t_fast,
            "timing_cycles_per_second": report.cycles / (t_trace),
        }
        rows.append(r)
        total_instr += len(stream)
        total_sched += t_sched
        print(
            f"{r['name']:<24}{len(stream):>8,}{r['scheduler_instructions_per_second']:>15,.0f}"
            f"{r['trace_instructions_per_second']:>15,.0f}{report.cycles:>12,}"
            f"{r['emulated_cycles_per_second']:>15.3g}{1e3 * t_fast:>9.1f}"
        )
    # Tile mode: every instruction executed with its checks, on a smaller matmul.
    tile = NPU(cfg, mode="tile")
    m, k, n = 64, 1152, 1152
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    tile.run(matmul, a, b)
    t_tile = best_of(lambda: tile.run(matmul, a, b), repeat=1)
    rep = tile.last_report
    tile_row = {
        "name": f"tile matmul M={m} K={k} N={n}",
        "instructions": len(rep.stream),
        "cycles": rep.cycles,
        "seconds": t_tile,
        "emulated_cycles_per_second": rep.cycles / t_tile,
        "instructions_per_second": len(rep.stream) / t_tile,
    }
    ips = total_instr / total_sched
    print(
        f"\nscheduler: {ips:,.0f} instructions per wall-second over {total_instr:,.0f} instructions (goal >= 1,000,000)"
    )
    best_fast = max(r["emulated_cycles_per_second"] for r in rows)
    print(
        f"fast mode: {best_fast:.3g} emulated cycles per wall-second at best (goal >= 1e8); the host's NumPy "
        f"math bounds it: the emulated chip is {chip(cfg)}, this host far less"
    )
    print(
        f"tile mode: {tile_row['emulated_cycles_per_second']:.3g} emulated cycles per wall-second "
        f"({tile_row['instructions_per_second']:,.0f} instructions/s executed with every check)"
    )
    if args.json:
        emit_json(
            {
                "npu": cfg.name,
                "instructions_per_second": ips,
                "emulated_cycles_per_second": best_fast,
                "rows": rows,
                "tile": tile_row,
            }
        )


if __name__ == "__main__":
    main()
