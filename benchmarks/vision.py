"""Gemma3's image encoding on one chip preset: the SigLIP So400m tower and the projector.

    python benchmarks/vision.py [--npu atom] [--image-size 896] [--layers 27] [--trace DIR] [--json]

One 896 x 896 image through the SigLIP So400m vision tower of Gemma 3 4B and larger (patch 14:
64 x 64 = 4096 patches; 27 pre-LayerNorm layers of hidden 1152, 16 heads of 72, MLP 4304; a
post-LayerNorm), then the multimodal projector (4 x 4 average pool to 256 tokens, Gemma RMSNorm,
projection to the text hidden size 2560 of Gemma 3 4B). One row per kernel role: the cycles of
one call, the calls per image and their total, with FLOPs, DRAM bytes, % of roofline and unit
utilisation; then the tower, the projection and the whole image. The whole image's "% of
roofline" is against the sum of its kernels' rooflines (each kernel bound by its own FLOPs or
bytes); the combined bound (all FLOPs, all bytes) is printed beside it.

Plans only, as compiling does (``npu.plan`` on shapes, no values): every call of one role has
the same shapes, so each role is planned once (``gemma3.vision.image_kernel_calls`` lists the
calls the model makes). Planning and scheduling take host time; the wall time is printed.
"""

from __future__ import annotations

import argparse
import os
import time

from common import ROOFLINE_FORMULA, chip, emit_json, row

from gemma3.vision import Gemma3VisionSpec, SiglipVisionConfig, image_kernel_calls
from npu_emulator import NPU, CycleReport

# SigLIP So400m / patch 14 / 896, as in Gemma 3 4B, 12B and 27B; the 4B's text hidden size.
SO400M = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=896,
    patch_size=14,
)
TEXT_HIDDEN = 2560
MM_TOKENS = 256


def roles(spec: Gemma3VisionSpec, dtype: str):
    """(role, kernel, signature, consts, calls per image) in the order an image runs them."""
    calls = image_kernel_calls(spec, dtype)
    layers = spec.vision.num_hidden_layers
    per_layer = ["layer_norm1", "qkv_proj", "attention", "out_proj", "layer_norm2", "mlp"]
    names = ["patch_embed"] + per_layer * layers + ["post_layernorm", "mm_projector"]
    out: dict[str, list] = {}
    for name, (kernel, signature, consts) in zip(names, calls, strict=True):
        if name in out:
            out[name][4] += 1
        else:
            out[name] = [name, kernel, signature, consts, 1]
    return [tuple(v) for v in out.values()]


def print_table(rows: list[dict]) -> None:
    """The common table's columns, wide enough for a whole image, with the calls per image."""
    head = (
        f"{'case':<18}{'calls':>6}{'cycles/call':>13}{'cycles':>14}{'ms':>9}{'GFLOP':>9}{'DRAM MB':>10}"
        f"{'roofline':>14}{'%roof':>7}  {'binding':<9}util matrix/vector/dma/dram"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        u = r["utilisation"]
        calls = r.get("calls", "")
        per_call = f"{r['cycles_per_call']:,}" if "cycles_per_call" in r else ""
        print(
            f"{r.get('role', r['name']):<18}{calls:>6}{per_call:>13}{r['cycles']:>14,}{r['emulated_us'] / 1e3:>9.3f}"
            f"{r['flops'] / 1e9:>9.1f}{r['dram_bytes'] / 1e6:>10.1f}{r['roofline_cycles']:>14,.0f}"
            f"{r['pct_of_roofline']:>7.1f}  {r.get('binding_unit', ''):<9}{100 * u.get('matrix', 0):.0f}/{100 * u.get('vector', 0):.0f}/"
            f"{100 * u.get('dma', 0):.0f}/{100 * u.get('dram', 0):.0f} %"
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--npu", default="atom")
    ap.add_argument("--image-size", type=int, default=SO400M["image_size"])
    ap.add_argument("--layers", type=int, default=SO400M["num_hidden_layers"])
    ap.add_argument("--trace", metavar="DIR", help="write one Perfetto trace per kernel role into DIR")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args()
    spec = Gemma3VisionSpec(
        SiglipVisionConfig(**{**SO400M, "image_size": args.image_size, "num_hidden_layers": args.layers}),
        text_hidden_size=TEXT_HIDDEN,
        mm_tokens_per_image=MM_TOKENS,
    )
    v = spec.vision
    npu = NPU(args.npu)
    cfg = npu.config
    print(f"image encoding on {chip(cfg)}, {npu.dtype}")
    print(
        f"SigLIP: {v.image_size} x {v.image_size} image, patch {v.patch_size} ({v.num_patches} patches), "
        f"{v.num_hidden_layers} layers, hidden {v.hidden_size}, {v.num_attention_heads} heads of {v.head_dim}, "
        f"MLP {v.intermediate_size}; projector: pool {spec.pool} to {MM_TOKENS} tokens, -> {TEXT_HIDDEN}"
    )
    print(ROOFLINE_FORMULA + "\n")
    rows, tower, projection, wall = [], [], [], {}
    t_all = time.perf_counter()
    for name, kernel, signature, consts, count in roles(spec, npu.dtype):
        t = time.perf_counter()
        report = npu.plan(kernel, signature, consts).report
        wall[name] = time.perf_counter() - t
        total = CycleReport.sequence(name, [report] * count)
        r = row(f"{name} x{count}", total)
        r.update(
            role=name, kernel=kernel.name, calls=count, cycles_per_call=report.cycles, plan_wall_s=wall[name]
        )
        rows.append(r)
        (projection if name == "mm_projector" else tower).append(total)
        if args.trace:
            os.makedirs(args.trace, exist_ok=True)
            report.write_trace(os.path.join(args.trace, f"vision_{name}.json"))
    plan_s = time.perf_counter() - t_all
    whole = tower + projection
    summary = []
    for name, parts in (("tower total", tower), ("projection total", projection), ("image total", whole)):
        seq = CycleReport.sequence(name, parts)
        r = row(name, seq)
        kernel_bound = sum(p.roofline_cycles for p in parts)
        r["combined_roofline_cycles"] = r["roofline_cycles"]
        r["combined_pct_of_roofline"] = r["pct_of_roofline"]
        r["roofline_cycles"] = kernel_bound
        r["pct_of_roofline"] = 100.0 * kernel_bound / seq.cycles
        r["binding_unit"] = "summed"  # each kernel's own binding bound, added up
        summary.append(r)
    print_table(rows + summary)
    image = summary[-1]
    print(
        f"\none image: {image['cycles']:,} cycles = {image['emulated_us'] / 1e3:.3f} ms at "
        f"{cfg.clock_hz / 1e9:g} GHz; {image['pct_of_roofline']:.1f}% of the sum of its kernels' rooflines, "
        f"{image['combined_pct_of_roofline']:.1f}% of the combined bound (each unit's bounds summed over the "
        "kernels, the largest)"
    )
    print(
        f"(planned and scheduled in {plan_s:.1f} s of host time: "
        + ", ".join(f"{k} {s:.1f} s" for k, s in wall.items())
        + ")"
    )
    if args.trace:
        print(f"traces in {args.trace}/: open one at https://ui.perfetto.dev")
    if args.json:
        emit_json(
            {
                "npu": cfg.name,
                "vision": v.to_dict(),
                "text_hidden_size": TEXT_HIDDEN,
                "mm_tokens_per_image": MM_TOKENS,
                "rows": rows,
                "totals": summary,
                "planning_wall_s": plan_s,
            }
        )


if __name__ == "__main__":
    main()
