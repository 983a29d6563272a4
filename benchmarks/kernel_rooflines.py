"""Every kernel Gemma3 uses, at the shapes of Gemma 3 270M, 1B, 4B and 27B, on one chip preset.

    python benchmarks/kernel_rooflines.py [--models 270m,1b,4b,27b] [--npu atom] [--trace DIR] [--json]

One row per kernel and phase (a prefill chunk of 256 tokens, and a decode step of one
sequence): cycles, emulated microseconds, FLOPs, DRAM bytes, % of roofline and utilisation.
Goals: matmul-dominated rows >= 85% of roofline, attention >= 75%, norms and elementwise ops
(bandwidth bound) >= 85% of the DRAM bound. Rows below goal are listed at the end with the reason.
Schedules are planned without values (trace only), so the run takes host time for planning
but none for the math.
"""

from __future__ import annotations

import argparse
import os
import time

from common import ROOFLINE_FORMULA, chip, emit_json, print_rows, row

from npu_emulator import NPU
from npu_kernels import (
    attention_decode,
    attention_prefill,
    embedding,
    geglu_mlp,
    kv_cache_write,
    lm_head,
    matmul,
    rmsnorm,
    rope,
)

# name: hidden, intermediate, heads, kv heads, head_dim, sliding window, vocab
MODELS = {
    "270m": (640, 2048, 4, 1, 256, 512, 262144),
    "1b": (1152, 6912, 4, 1, 256, 512, 262144),
    "4b": (2560, 10240, 8, 4, 256, 1024, 262208),
    "27b": (5376, 21504, 32, 16, 128, 1024, 262208),
}
CHUNK = 256  # prefill chunk (tokens)
CONTEXT = 4096  # global KV cache length and RoPE table rows in these cases
GOALS = {"matmul": 85.0, "attention": 75.0, "bandwidth": 85.0}


def bf(*shape):
    return (tuple(shape), "bf16")


def i32(*shape):
    return (tuple(shape), "int32")


def cases(model: str):
    d, f, hq, hkv, hd, window, vocab = MODELS[model]
    qkv = (hq + 2 * hkv) * hd
    scale = hd**-0.5
    for phase, t in (("prefill", CHUNK), ("decode", 1)):
        yield phase, "embedding", "bandwidth", embedding, [i32(t), bf(vocab, d)], {"scale": d**0.5}
        yield phase, "rmsnorm", "bandwidth", rmsnorm, [bf(t, d), bf(d)], {"eps": 1e-6}
        yield phase, "qkv_proj", "matmul", matmul, [bf(t, d), bf(d, qkv)], {}
        yield phase, "q_norm", "bandwidth", rmsnorm, [bf(t, hq, hd), bf(hd)], {"eps": 1e-6}
        yield (
            phase,
            "rope_q",
            "bandwidth",
            rope,
            [bf(t, hq, hd), bf(CONTEXT, hd), bf(CONTEXT, hd), i32(t)],
            {},
        )
        yield (
            phase,
            "kv_cache_write",
            "bandwidth",
            kv_cache_write,
            [bf(1, hkv, CONTEXT, hd), bf(1, t, hkv, hd), i32(1, t, hkv)],
            {},
        )
        if phase == "prefill":
            new = [bf(t, hq, hd), bf(t, hkv, hd), bf(t, hkv, hd)]
            ring, full = bf(1, hkv, window, hd), bf(1, hkv, CONTEXT, hd)
            sliding = {"q_start": 2 * window, "scale": scale, "window": window, "ring": True}
            yield phase, "attention_sliding", "attention", attention_prefill, new + [ring, ring], sliding
            yield (
                phase,
                "attention_global",
                "attention",
                attention_prefill,
                new + [full, full],
                {"q_start": 768, "scale": scale},
            )
        else:
            q = bf(1, hq, hd)
            ring, full = bf(1, hkv, window, hd), bf(1, hkv, CONTEXT, hd)
            yield (
                phase,
                "attention_sliding",
                "attention",
                attention_decode,
                [q, ring, ring, ((1, window), "fp32")],
                {"scale": scale},
            )
            yield (
                phase,
                "attention_global",
                "attention",
                attention_decode,
                [q, full, full, ((1, CONTEXT), "fp32")],
                {"scale": scale},
            )
        yield phase, "o_proj", "matmul", matmul, [bf(t, hq * hd), bf(hq * hd, d)], {}
        yield phase, "geglu_mlp", "matmul", geglu_mlp, [bf(t, d), bf(d, f), bf(d, f), bf(f, d)], {}
        if phase == "decode" or model == "270m":
            yield phase, "lm_head", "matmul", lm_head, [bf(1, d), bf(d, vocab), i32(vocab)], {}


def reason(r: dict, cfg) -> str:
    latency = cfg.dma_dram_latency
    if r["roofline_cycles"] < 8 * latency:
        return (
            f"latency bound: the roofline is {r['roofline_cycles']:,.0f} cycles, under 8 DRAM latencies "
            f"({8 * latency:,} cycles); a load, the compute and a store each wait one"
        )
    return "below goal at a size where bandwidth or compute should dominate"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="270m,1b,4b,27b")
    ap.add_argument("--npu", default="atom")
    ap.add_argument("--trace", metavar="DIR", help="write one Perfetto trace per row into DIR")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args()
    npu = NPU(args.npu)
    cfg = npu.config
    print(f"kernels on {chip(cfg)}; prefill chunk {CHUNK}, decode batch 1")
    print(ROOFLINE_FORMULA)
    print("goals: matmul-dominated >= 85%, attention >= 75%, bandwidth-bound >= 85% of roofline\n")
    rows, below = [], []
    t0 = time.perf_counter()
    for model in args.models.split(","):
        for phase, name, kind, kernel, sig, consts in cases(model):
            report = npu.plan(kernel, sig, consts).report
            r = row(f"{model} {phase} {name}", report)
            r.update(model=model, phase=phase, kernel=kernel.name, kind=kind, goal=GOALS[kind])
            rows.append(r)
            if r["pct_of_roofline"] < r["goal"]:
                below.append(r)
            if args.trace:
                os.makedirs(args.trace, exist_ok=True)
                report.write_trace(os.path.join(args.trace, f"{model}_{phase}_{name}.json"))
    print_rows(rows)
    print(f"\nrows below goal: {len(below)} of {len(rows)}")
    for r in below:
        r["reason"] = reason(r, cfg)
        print(f"  {r['name']}: {r['pct_of_roofline']:.1f}% < {r['goal']:.0f}%: {r['reason']}")
    print(f"\n(planned in {time.perf_counter() - t0:.1f} s of host time)")
    if args.trace:
        print(f"traces in {args.trace}/: open one at https://ui.perfetto.dev")
    if args.json:
        emit_json({"npu": cfg.name, "chunk": CHUNK, "rows": rows, "below_goal": [r["name"] for r in below]})


if __name__ == "__main__":
    main()
