"""What multi-LoRA costs on the emulated chip: Gemma 3 270M and 4B, ranks 8, 16 and 64, against no adapter.

    python benchmarks/lora.py [--npu atom] [--models 270m,4b] [--ranks 8,16,64] [--batch 1]
        [--prompt-tokens 256] [--adapters 2] [--json]

Plan-only (``gemma3.estimate``: the kernels ``Gemma3OnNPU`` runs, planned at their shapes, no
weights): one prefill chunk of ``--prompt-tokens`` tokens and one decode step of ``--batch``
sequences, with ``--adapters`` adapters compiled (plus the reserved base one, id 0) at each rank,
targeting every projection (q, k, v, o, gate, up, down: peft's "all-linear", the costliest) or
the attention only (q, v: peft's default for many models). One row per model, targets, rank and
phase: its cycles and time, the LoRA kernels' share, and the overhead against the same phase
with no adapter compiled. Then, per model, the lora kernel of one decode row at the widest
projection (gate, hidden -> intermediate) with its roofline.

Roofline of a decode step's lora call: the adapter's A and B (``(in + out) * rank`` elements,
the selected adapter only) plus x, y and out, over the DRAM bandwidth; the base projection
streams ``in * out`` elements, so rank r adds about ``r (in + out) / (in * out)`` of its bytes.
An all-linear adapter also unfuses the MLP (gate and up as separate matmuls, the GeGLU epilogue,
down), so its overhead includes the MLP's lost fusion.
"""

from __future__ import annotations

import argparse
import time

from common import ROOFLINE_FORMULA, chip, emit_json, row

from gemma3.config import Gemma3TextConfig
from gemma3.estimate import LORA_TARGETS, estimate
from npu_emulator import NPU, get_preset
from npu_kernels.lora import lora

# Gemma 3 text configs (config.json's fields; layer_types default: every 6th layer global)
MODELS = {
    "270m": dict(
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        sliding_window=512,
        vocab_size=262144,
        max_position_embeddings=32768,
        query_pre_attn_scalar=256,
    ),
    "4b": dict(
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=34,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        sliding_window=1024,
        vocab_size=262208,
        max_position_embeddings=131072,
        query_pre_attn_scalar=256,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
    ),
}
TARGETS = {"all-linear": LORA_TARGETS, "q,v": ("q", "v")}


def phase_row(name, e, phase: str, base) -> dict:
    p, b = getattr(e, phase), getattr(base, phase)
    lora_cycles = p.roles["lora"].cycles if "lora" in p.roles else 0
    return {
        "name": name,
        "cycles": p.cycles,
        "emulated_us": p.cycles / e.clock_hz * 1e6,
        "flops": sum(r.flops for r in p.roles.values()),
        "dram_bytes": sum(r.dram_bytes for r in p.roles.values()),
        "lora_kernel_cycles": lora_cycles,
        "lora_kernel_pct": 100 * lora_cycles / p.cycles,
        "overhead_pct": 100 * (p.cycles - b.cycles) / b.cycles,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--npu", default="atom")
    ap.add_argument("--models", default="270m,4b")
    ap.add_argument("--ranks", default="8,16,64")
    ap.add_argument("--batch", type=int, default=1, help="sequences in the decode step")
    ap.add_argument("--prompt-tokens", type=int, default=256, help="the prefill chunk (tokens)")
    ap.add_argument("--adapters", type=int, default=2, help="adapters compiled besides the base one")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args()
    cfg = get_preset(args.npu)
    ranks = [int(r) for r in args.ranks.split(",")]
    t0 = time.perf_counter()
    print(chip(cfg))
    print(f"batch {args.batch}, prefill chunk {args.prompt_tokens} tokens, {args.adapters} adapters + base\n")
    work = dict(batch=args.batch, prompt_tokens=args.prompt_tokens, new_tokens=2, chunk=args.prompt_tokens)
    rows = []
    head = f"{'case':<36}{'cycles':>14}{'ms':>10}{'lora kernels %':>16}{'overhead %':>12}"
    print(head)
    print("-" * len(head))
    for model in args.models.split(","):
        c = Gemma3TextConfig.from_dict({"model_type": "gemma3_text", **MODELS[model]}, model)
        base = estimate(c, cfg, **work)
        for phase in ("prefill", "decode_step"):
            p = getattr(base, phase)
            r = {
                "name": f"{model} {phase} no adapter",
                "cycles": p.cycles,
                "emulated_us": p.cycles / base.clock_hz * 1e6,
            }
            r.update(
                flops=sum(x.flops for x in p.roles.values()),
                dram_bytes=sum(x.dram_bytes for x in p.roles.values()),
            )
            r.update(lora_kernel_cycles=0, lora_kernel_pct=0.0, overhead_pct=0.0)
            rows.append(r)
            print(f"{r['name']:<36}{r['cycles']:>14,}{r['emulated_us'] / 1e3:>10.3f}")
        for label, targets in TARGETS.items():
            for rank in ranks:
                e = estimate(
                    c, cfg, **work, lora_rank=rank, lora_adapters=args.adapters, lora_targets=targets
                )
                for phase in ("prefill", "decode_step"):
                    r = phase_row(f"{model} {phase} r{rank} {label}", e, phase, base)
                    rows.append(r)
                    print(
                        f"{r['name']:<36}{r['cycles']:>14,}{r['emulated_us'] / 1e3:>10.3f}"
                        f"{r['lora_kernel_pct']:>16.2f}{r['overhead_pct']:>12.2f}"
                    )
        d, f = MODELS[model]["hidden_size"], MODELS[model]["intermediate_size"]
        n = args.adapters + 1
        for rank in ranks:
            sig = [
                ((1, d), "bf16"),
                ((1, f), "bf16"),
                ((n, d, rank), "bf16"),
                ((n, f, rank), "bf16"),
                ((1,), "int32"),
            ]
            rep = NPU(cfg).plan(lora, sig, {}).report
            rows.append(row(f"{model} lora kernel gate decode r{rank}", rep))
    print("\nthe lora kernel alone (one decode row, gate projection):")
    print(ROOFLINE_FORMULA)
    for r in rows:
        if "pct_of_roofline" in r:
            print(
                f"  {r['name']:<36}{r['cycles']:>10,} cycles  {r['pct_of_roofline']:6.1f}% of roofline ({r['binding_unit']})"
            )
    wall = time.perf_counter() - t0
    print(f"\n(planned in {wall:.1f} s of host time)")
    if args.json:
        emit_json({"npu": cfg.name, "batch": args.batch, "prompt_tokens": args.prompt_tokens, "rows": rows})


if __name__ == "__main__":
    main()
