"""Tensor parallelism: Gemma 3 1B / 4B / 27B decode and prefill over 1-16 emulated devices.

    python benchmarks/tensor_parallel.py [--models 1b,4b,27b] [--tp 1,2,4,8,16] [--npu rbln-ca12]
        [--prompt-tokens 128] [--chunk 128] [--json]

Each row is ``gemma3.estimate`` (plan only, no weights) of one model at one tensor-parallel
size on ``--npu`` devices joined by the preset's link (rbln-ca12: ATOM+ dies over PCIe Gen5 x16
through a switch, npu_emulator/config.py): Megatron-style shards (heads, MLP columns and the
vocabulary split, o_proj / down_proj row-split with an all-reduce each, the LM head's argmax
all-gathered), every device running the same shapes, so a step is one device's kernels plus
the collectives. Columns: the decode step (batch 1, at the prompt's end) and one prefill chunk,
their communication share, the speed-up over TP 1 and the scaling efficiency
``t(1) / (tp * t(tp))``, and each device's weights against its DRAM (a model whose weights do not
fit a device at TP 1 or 2 is costed all the same: the point of the row is the scaling). A size
past the model's query heads (the 1B's 4 at TP 8 and 16) has no Megatron split, as in vLLM and
here (``gemma3.tensor_parallel.plan_shards``): its row says so.
Times include the preset's host time per call (``host_step_us``), which no device count
shortens.

The roofline the decode step is held against: weight bytes per device / sustained DRAM
bandwidth; what TP cannot divide: the collectives (2 all-reduces a layer, each at least one
link latency per step of its algorithm), every kernel's launch cost and the host's time per call.

Plans take host time: every kernel is planned at every shard shape (the default 15 rows took
8-10 minutes on a loaded 2-core machine; ``--models 4b,27b --tp 8,16`` is the short run of the
cases the Rebellions model zoo runs); the wall time is printed.
"""

from __future__ import annotations

import argparse
import time

from common import emit_json

from gemma3.config import Gemma3TextConfig
from gemma3.estimate import estimate
from npu_emulator import get_link, get_preset

# Gemma 3 text stacks as their config.json reads (the fields the estimate reads).
GEMMA3 = dict(
    model_type="gemma3_text",
    vocab_size=262208,
    head_dim=256,
    query_pre_attn_scalar=256,
    max_position_embeddings=131072,
    rope_theta=1_000_000.0,
    rope_local_base_freq=10_000.0,
    rope_scaling={"rope_type": "linear", "factor": 8.0},
    sliding_window=1024,
    rms_norm_eps=1e-6,
)
MODELS = {
    "1b": dict(
        GEMMA3,
        vocab_size=262144,
        hidden_size=1152,
        intermediate_size=6912,
        num_hidden_layers=26,
        num_attention_heads=4,
        num_key_value_heads=1,
        sliding_window=512,
        max_position_embeddings=32768,
        rope_scaling=None,
    ),
    "4b": dict(
        GEMMA3,
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=34,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
    "27b": dict(
        GEMMA3,
        hidden_size=5376,
        intermediate_size=21504,
        num_hidden_layers=62,
        num_attention_heads=32,
        num_key_value_heads=16,
        head_dim=128,
        query_pre_attn_scalar=168,
    ),
}


def measure(model: str, tp: int, npu: str, prompt_tokens: int, chunk: int) -> dict:
    c = Gemma3TextConfig.from_dict(MODELS[model], f"gemma-3-{model}")
    e = estimate(c, npu, prompt_tokens=prompt_tokens, new_tokens=2, chunk=chunk, tp=tp)
    d = e.to_dict()
    step, pre = e.decode_step, e.prefill
    chunks = pre.calls
    cfg = get_preset(npu)
    dram_bytes = sum(r.dram_bytes for r in step.roles.values())
    bound = dram_bytes / (cfg.dram_bytes_per_cycle * cfg.dram_efficiency)
    return {
        "name": f"gemma-3-{model} tp{tp}",
        "model": model,
        "tp": tp,
        "decode_step_ms": e.decode_step_ms,
        "decode_tok_s": d["decode_tok_s"],
        "decode_comm_ms": d["decode_step_comm_ms"],
        "decode_comm_share": step.split()["communication"],
        "decode_split": step.split(),
        "prefill_chunk_ms": e.prefill_ms / chunks,
        "prefill_comm_ms": d["prefill_comm_ms"] / chunks,
        "prefill_comm_share": pre.split()["communication"],
        "prefill_split": pre.split(),
        "weight_bytes_per_device": e.weight_bytes_per_device,
        "weights_fit": d["weights_fit"],
        # the decode step's DRAM bound on one device: its DRAM bytes at the sustained rate
        "decode_dram_bound_ms": bound / cfg.clock_hz * 1e3,
        "cycles": step.cycles,
        "emulated_us": step.cycles / e.clock_hz * 1e6,
        "flops": sum(r.flops for r in step.roles.values()),
        "dram_bytes": dram_bytes,
        "pct_of_roofline": 100 * bound / step.cycles,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="1b,4b,27b")
    ap.add_argument("--tp", default="1,2,4,8,16", help="tensor-parallel sizes")
    ap.add_argument("--npu", default="rbln-ca12", help="the devices' chip preset (its link joins them)")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="one prefill chunk's worth by default")
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"unknown model {m!r}; known: {sorted(MODELS)}")
    tps = [int(t) for t in args.tp.split(",") if t]
    cfg = get_preset(args.npu)
    link = get_link(None, cfg)
    print(
        f"{cfg.name} devices: {cfg.dram_bytes / 2**30:.0f} GiB DRAM at "
        f"{cfg.dram_bytes_per_cycle * cfg.dram_efficiency * cfg.clock_hz / 1e9:.0f} GB/s sustained; "
        f"link {link.name} ({link.topology}): {link.bytes_per_cycle * cfg.clock_hz / 1e9:.0f} GB/s per direction, "
        f"{link.latency_cycles / cfg.clock_hz * 1e6:.1f} us per transfer; host {cfg.host_step_us:.0f} us per call"
    )
    print(
        f"decode: batch 1 at position {args.prompt_tokens}; prefill: one {args.chunk}-token chunk; "
        "efficiency = t(tp 1) / (tp * t(tp))\n"
    )
    head = (
        f"{'model':<7}{'tp':>4}{'decode ms':>11}{'tok/s':>9}{'comm ms':>9}{'comm %':>8}{'speed-up':>9}"
        f"{'eff %':>7}{'DRAM-bound ms':>15}{'prefill ms':>12}{'comm %':>8}{'eff %':>7}{'GiB/dev':>9}  fits"
    )
    print(head)
    print("-" * len(head))
    t0 = time.perf_counter()
    rows = []
    for m in models:
        base = None
        for tp in tps:
            try:
                r = measure(m, tp, cfg, args.prompt_tokens, args.chunk)
            except ValueError as e:  # more devices than query heads: no Megatron split
                print(f"{m:<7}{tp:>4}  not split: {e}", flush=True)
                rows.append({"model": m, "tp": tp, "error": str(e)})
                continue
            if base is None:
                base = r
            r["decode_speedup"] = base["decode_step_ms"] / r["decode_step_ms"]
            r["decode_efficiency"] = r["decode_speedup"] * base["tp"] / tp
            r["prefill_speedup"] = base["prefill_chunk_ms"] / r["prefill_chunk_ms"]
            r["prefill_efficiency"] = r["prefill_speedup"] * base["tp"] / tp
            rows.append(r)
            print(
                f"{m:<7}{tp:>4}{r['decode_step_ms']:>11.3f}{r['decode_tok_s']:>9.1f}{r['decode_comm_ms']:>9.3f}"
                f"{100 * r['decode_comm_share']:>8.1f}{r['decode_speedup']:>9.2f}{100 * r['decode_efficiency']:>7.1f}"
                f"{r['decode_dram_bound_ms']:>15.3f}{r['prefill_chunk_ms']:>12.3f}{100 * r['prefill_comm_share']:>8.1f}"
                f"{100 * r['prefill_efficiency']:>7.1f}{r['weight_bytes_per_device'] / 2**30:>9.2f}"
                f"  {'yes' if r['weights_fit'] else 'no'}",
                flush=True,
            )
    wall = time.perf_counter() - t0
    print(f"\n(planned in {wall:.0f} s of host time)")
    if args.json:
        emit_json({"npu": cfg.name, "link": link.name, "wall_s": wall, "rows": rows})


if __name__ == "__main__":
    main()
