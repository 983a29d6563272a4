"""Matmul on the atom preset at Gemma3 linear shapes: cycles, % of roofline, utilisation.

python benchmarks/matmul.py [--npu atom] [--trace DIR] [--json]
"""

from __future__ import annotations

import argparse
import os
import time

from common import ROOFLINE_FORMULA, chip, emit_json, print_rows, row

from npu_emulator import NPU
from npu_kernels.matmul import choose_tiling, matmul

SHAPES = [(640, 2048), (2048, 640), (1152, 4304), (2560, 10240), (640, 262144)]
GOAL = 85.0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--npu", default="atom")
    ap.add_argument("--trace", metavar="DIR", help="write one Perfetto trace per case into DIR")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args()
    npu = NPU(args.npu)
    cfg = npu.config
    print(f"matmul on {chip(cfg)}, bf16")
    print(ROOFLINE_FORMULA + "\n")
    rows = []
    t0 = time.perf_counter()
    for m in (1, 256):
        for k, n in SHAPES:
            name = f"M={m} K={k} N={n}"
            report = npu.plan(matmul, [((m, k), "bf16"), ((k, n), "bf16")], {}).report
            t = choose_tiling(cfg, m, k, n, "bf16", "bf16", 2)
            r = row(name, report)
            r["tiling"] = {"grid": [t.gm, t.gn], "tk": t.tk, "tn": t.tn}
            rows.append(r)
            if args.trace:
                os.makedirs(args.trace, exist_ok=True)
                report.write_trace(os.path.join(args.trace, f"matmul_M{m}_K{k}_N{n}.json"))
    print_rows(rows, GOAL)
    print(f"\n(planned and scheduled in {time.perf_counter() - t0:.1f} s of host time)")
    if args.json:
        emit_json({"npu": cfg.name, "goal_pct_of_roofline": GOAL, "rows": rows})


if __name__ == "__main__":
    main()
