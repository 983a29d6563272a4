"""Generation on the default model (Gemma 3 270M): host speed beside transformers, emulated cost.

    python benchmarks/generate.py [--prompt-tokens 512] [--new-tokens 128] [--llama-python PY] [--json]

In one process: our ``generate`` (fast mode, the compiled default model from the cache) on a
prompt of ``--prompt-tokens`` tokens, greedy, ``--new-tokens`` new tokens (EOS ignored), and
once more on the same prompt (also printed; the ratios are the first run's: a compiled model
that did not plan a shape the run reaches traces it then, see ``Gemma3OnNPU.plan_every_shape``);
then,
when the oracle extra is installed, transformers (fp32, CPU, its default threads) on the same
converted weights and the same prompt: one forward over the prompt, then one token per step
with its KV cache, as ``generate`` does inside. Prints host prefill / decode tokens per second
of both and their ratio, the emulated cycles, milliseconds and tokens per second of prefill and
decode on the chip, beside the DRAM-bandwidth bound of a decode step (its compulsory bytes over
the chip's DRAM bytes per cycle), and peak resident memory (after ours, and at the end).

With llama.cpp (``llama-cpp-python``: the optional ``llama`` extra, never needed by the tests;
in this interpreter, or in another one named by ``--llama-python``), the same prompt and
greedy decoding on the same GGUF, as shipped (Q4_K_M) and converted to BF16 by llama.cpp's own
quantize (cached beside the GGUF), 2 threads; without it those rows are skipped, saying so.
Also the machine's read bandwidth (a 2-thread Numba read of a 512 MB array, best of 3) beside
our decode's achieved weight bytes per second: the bytes of every matrix a decode step streams
(as held on the host: bf16 under bf16 numerics; greedy steps that return no logits read the LM
head's int8 screen instead of its bf16 matrix, ``npu_kernels.lm_head.ArgmaxScreen``) times
decode steps per second.

Measured side by side in one run on purpose: these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from common import emit_json  # also puts the repository on sys.path

TEXT = (
    "The history of computing is a story of layers. At the bottom, transistors switch; above them, "
    "logic gates add and compare; above those, processors fetch instructions, decode them and move "
    "numbers between registers and memory. Each layer hides the one below it, and each new layer "
    "makes the machine easier to use and harder to see. Accelerators for neural networks add one "
    "more: arrays of multipliers fed by direct memory access engines, small fast memories next to "
    "them, and a compiler that decides which tile of which matrix sits where at every moment. "
)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def prompt_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(TEXT * (n // 50 + 2))
    if len(ids) < n:
        raise ValueError(f"the benchmark text gives only {len(ids)} tokens, {n} wanted")
    return ids[:n]


def cpu_name() -> str:
    """The CPU's model name and core count (Linux), for the figures' label."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else 'unknown CPU'}, {os.cpu_count()} cores"


def read_bandwidth(megabytes: int = 512, repeats: int = 3) -> float:
    """Bytes per second a 2-thread Numba loop reads from a ``megabytes`` array (best of
    ``repeats``): an integer sum, which the compiler may vectorise and reorder freely."""
    import numba
    import numpy as np

    @numba.njit(parallel=True)
    def total(x):
        s = 0
        for i in numba.prange(x.shape[0]):
            s += x[i]
        return s

    data = np.ones(megabytes * (1 << 20) // 8, np.int64)
    total(data[:1024])  # compile
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        total(data)
        best = min(best, time.perf_counter() - t)
    return data.nbytes / best


def streamed_bytes(model) -> int:
    """Bytes of the matrices a decode step streams, as the host holds them: on the host decode
    path, the LM head's int8 screen where greedy steps used it instead of its bf16 matrix."""
    from gemma3.runtime import is_matrix

    if model.runtime.host_decode is not None:
        return model.runtime.host_decode.streamed_bytes()
    return sum(t.numpy().nbytes for name, t in model.runtime.weights.items() if is_matrix(name))


def ours(ids: list[int], new_tokens: int) -> dict:
    from gemma3 import NPUGemma3ForCausalLM
    from gemma3.default_model import compiled_default_dir

    t = time.perf_counter()
    model = NPUGemma3ForCausalLM.from_pretrained(compiled_default_dir(len(ids) + new_tokens))
    load_s = time.perf_counter() - t
    # Warm-up: Numba's compiled code (loaded from its cache on first call: the fused decode step
    # runs from the second step at an attention length, so 3 steps), the page cache, and the LM
    # head's int8 screen (made once per loaded model, timed here; a generate expecting at least
    # gemma3.host_step.SCREEN_AFTER greedy steps makes it on its first step).
    model.generate([ids[:8]], max_new_tokens=4)
    t = time.perf_counter()
    if model.runtime.host_decode is not None:
        model.runtime.host_decode.screen()
    screen_s = time.perf_counter() - t
    out = model.generate([ids], max_new_tokens=new_tokens, eos_token_id=[])
    tokens = out[0][len(ids) :]
    rep = model.last_report
    # Again, the same prompt: the chip's plans for this prompt's shapes (the later prefill
    # chunks' attention, the decode steps' attention lengths) are traced on first use, in the run
    # above's host time; this run has them. Reported beside, the ratios stay the first run's.
    again = model.generate([ids], max_new_tokens=new_tokens, eos_token_id=[])
    again_rep = model.last_report
    assert list(again[0][len(ids) :]) == list(tokens)
    cfg = model.runtime.npu.config
    steps = rep.new_tokens  # decode steps run (the first new token comes from prefill)
    decode_bytes = rep.decode.io_bytes / steps  # compulsory: weights, KV cache read, activations
    return {
        "tokens": [int(t) for t in tokens],
        "load_s": load_s,
        "screen_s": screen_s,
        "host_prefill_s": rep.host_prefill_s,
        "host_decode_s": rep.host_decode_s,
        "host_prefill_tok_s": len(ids) / rep.host_prefill_s,
        "host_decode_tok_s": steps / rep.host_decode_s,
        "decode_steps": steps,
        "again_host_prefill_tok_s": len(ids) / again_rep.host_prefill_s,
        "again_host_decode_tok_s": steps / again_rep.host_decode_s,
        "decode_weight_bytes_per_step": streamed_bytes(model),
        "decode_weight_bytes_per_s": streamed_bytes(model) * steps / rep.host_decode_s,
        "npu": cfg.name,
        "emulated": {
            "prefill_cycles": rep.prefill.cycles,
            "prefill_ms": rep.prefill.time_us / 1e3,
            "prefill_tok_s": len(ids) / (rep.prefill.time_us / 1e6),
            "decode_cycles": rep.decode.cycles,
            "decode_ms": rep.decode.time_us / 1e3,
            "decode_tok_s": steps / (rep.decode.time_us / 1e6),
            "decode_cycles_per_token": rep.decode.cycles / steps,
            "decode_dram_bytes_per_token": decode_bytes,
            "decode_dram_bound_cycles_per_token": decode_bytes / cfg.dram_bytes_per_cycle,
            "decode_pct_of_dram_bound": 100
            * (decode_bytes / cfg.dram_bytes_per_cycle)
            / (rep.decode.cycles / steps),
        },
        "peak_rss_mb": peak_rss_mb(),
        "model_dir": "default (Gemma 3 270M, compiled cache)",
    }


def transformers_run(model_dir: str, ids: list[int], new_tokens: int) -> dict | None:
    try:
        import torch
        import transformers
    except ImportError:
        return None
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        model(torch.tensor([ids[:8]]))  # warm-up
        x = torch.tensor([ids])
        t = time.perf_counter()
        out = model(x, use_cache=True)
        prefill_s = time.perf_counter() - t
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = [int(tok)]
        t = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(tok))
        decode_s = time.perf_counter() - t
    return {
        "tokens": tokens,
        "host_prefill_s": prefill_s,
        "host_decode_s": decode_s,
        "host_prefill_tok_s": len(ids) / prefill_s,
        "host_decode_tok_s": (new_tokens - 1) / decode_s,
        "torch_threads": torch.get_num_threads(),
    }


# Run by llama-cpp-python's interpreter: argv = gguf, bf16 copy, prompt ids (JSON), new tokens.
LLAMA_SCRIPT = r"""
import json, os, sys, time
import numpy as np
import llama_cpp

gguf, bf16, ids, new = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
if not os.path.exists(bf16):  # llama.cpp's own quantize, Q4_K_M -> BF16 (requantize allowed)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_BF16
    params.allow_requantize = True
    tmp = bf16 + ".part"
    if llama_cpp.llama_model_quantize(gguf.encode(), tmp.encode(), params) != 0:
        raise SystemExit("llama.cpp's quantize to BF16 failed")
    os.replace(tmp, bf16)


def last_argmax(llm):
    # The last position's logits, from the context (Llama.scores holds them only with logits_all).
    logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return int(np.argmax(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),))))


runs = {}
for name, path in (("q4_k_m", gguf), ("bf16", bf16)):
    n_ctx = len(ids) + new + 8  # n_batch as large: the logits buffer has n_batch rows
    llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_threads=2, n_threads_batch=2, n_batch=n_ctx, verbose=False)
    llm.eval(ids[:8])  # warm-up
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    prefill_s = time.perf_counter() - t
    tokens = [last_argmax(llm)]
    t = time.perf_counter()
    for _ in range(new - 1):
        llm.eval(tokens[-1:])
        tokens.append(last_argmax(llm))
    decode_s = time.perf_counter() - t
    runs[name] = {"tokens": tokens, "host_prefill_tok_s": len(ids) / prefill_s,
                  "host_decode_tok_s": (new - 1) / decode_s, "version": llama_cpp.__version__}
    del llm
print(json.dumps(runs))
"""


def llama_cpp_run(ids: list[int], new_tokens: int, python: str | None) -> tuple[dict | None, str]:
    """llama.cpp on the default GGUF (Q4_K_M) and its BF16 conversion: (results, note)."""
    from gemma3.default_model import default_gguf

    python = python or sys.executable
    if python == sys.executable:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            return (
                None,
                "llama.cpp skipped: llama-cpp-python is not installed (the llama extra; or --llama-python)",
            )
    gguf = default_gguf()
    bf16 = os.path.splitext(gguf)[0] + ".llama-cpp-bf16.gguf"
    done = subprocess.run(
        [python, "-c", LLAMA_SCRIPT, gguf, bf16, json.dumps(ids), str(new_tokens)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        return None, f"llama.cpp skipped: it failed ({tail[0]})"
    return json.loads(done.stdout.strip().splitlines()[-1]), ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--no-transformers", action="store_true", help="measure ours only")
    p.add_argument("--no-llama", action="store_true", help="skip llama.cpp")
    p.add_argument(
        "--llama-python", help="an interpreter with llama-cpp-python installed (default: this one)"
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    from gemma3.default_model import default_model_dir
    from gemma3.tokenizer import Gemma3Tokenizer

    hf_dir = default_model_dir()
    ids = prompt_ids(Gemma3Tokenizer(hf_dir), args.prompt_tokens)
    result = {"cpu": cpu_name(), "prompt_tokens": len(ids), "new_tokens": args.new_tokens}
    result["ours"] = ours(ids, args.new_tokens)
    hf = None if args.no_transformers else transformers_run(hf_dir, ids, args.new_tokens)
    result["transformers"] = hf
    result["ratio"] = {}
    if hf is not None:
        o = result["ours"]
        result["ratio"]["prefill"] = o["host_prefill_tok_s"] / hf["host_prefill_tok_s"]
        result["ratio"]["decode"] = o["host_decode_tok_s"] / hf["host_decode_tok_s"]
        result["tokens_agree_before"] = agree_before(o["tokens"], hf["tokens"])
    llama, note = (
        (None, "llama.cpp skipped (--no-llama)")
        if args.no_llama
        else llama_cpp_run(ids, args.new_tokens, args.llama_python)
    )
    result["llama_cpp"], result["llama_cpp_note"] = llama, note
    if llama is not None:
        o = result["ours"]
        for name, run in llama.items():
            result["ratio"][f"decode_vs_llama_{name}"] = o["host_decode_tok_s"] / run["host_decode_tok_s"]
            result["ratio"][f"prefill_vs_llama_{name}"] = o["host_prefill_tok_s"] / run["host_prefill_tok_s"]
            run["tokens_agree_before"] = agree_before(o["tokens"], run["tokens"])
    result["read_bytes_per_s"] = read_bandwidth()
    result["decode_pct_of_read_bandwidth"] = (
        100 * result["ours"]["decode_weight_bytes_per_s"] / result["read_bytes_per_s"]
    )
    result["peak_rss_mb_end"] = peak_rss_mb()
    if args.json:
        emit_json(result)
        return
    report(result)


def agree_before(ours: list[int], theirs: list[int]) -> int:
    """How many leading greedy tokens two runs share."""
    differ = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    return min(len(ours), len(theirs)) if differ is None else differ


def report(r: dict) -> None:
    o, hf, e = r["ours"], r["transformers"], r["ours"]["emulated"]
    print(f"prompt {r['prompt_tokens']} tokens, {r['new_tokens']} new tokens, greedy; host: {r['cpu']}")
    print(
        f"ours: loaded the compiled model in {o['load_s']:.1f} s (numerics bf16, fast mode); made the LM "
        f"head's int8 screen in {o['screen_s']:.2f} s"
    )
    print()
    print(f"{'host tokens/s':<16}{'ours':>10}{'transformers':>14}{'ratio':>8}")
    for phase in ("prefill", "decode"):
        mine = o[f"host_{phase}_tok_s"]
        if hf is None:
            print(f"{phase:<16}{mine:>10.1f}{'-':>14}{'-':>8}")
        else:
            print(f"{phase:<16}{mine:>10.1f}{hf[f'host_{phase}_tok_s']:>14.1f}{r['ratio'][phase]:>7.2f}x")
    print(
        f"(ours again on the same prompt: prefill "
        f"{o['again_host_prefill_tok_s']:.1f}, decode {o['again_host_decode_tok_s']:.1f} tokens/s)"
    )
    if hf is not None:
        print(
            f"(transformers fp32 on {hf['torch_threads']} threads; greedy tokens agree for the first "
            f"{r['tokens_agree_before']} of {len(o['tokens'])}: ours compute in bf16 numerics)"
        )
    for name, run in (r["llama_cpp"] or {}).items():
        print(
            f"llama.cpp {run['version']} ({name}, 2 threads): prefill {run['host_prefill_tok_s']:.1f}, decode "
            f"{run['host_decode_tok_s']:.1f} tokens/s; ours against it: prefill "
            f"{r['ratio'][f'prefill_vs_llama_{name}']:.2f}x, decode {r['ratio'][f'decode_vs_llama_{name}']:.2f}x; "
            f"greedy tokens agree with ours for the first {run['tokens_agree_before']}"
        )
    if r["llama_cpp_note"]:
        print(r["llama_cpp_note"])
    print(
        f"decode streams {o['decode_weight_bytes_per_step'] / 1e6:.0f} MB of weights a step: "
        f"{o['decode_weight_bytes_per_s'] / 1e9:.1f} GB/s achieved, {r['decode_pct_of_read_bandwidth']:.0f}% of "
        f"this machine's measured read bandwidth ({r['read_bytes_per_s'] / 1e9:.1f} GB/s: 2-thread Numba read of "
        f"512 MB, best of 3)"
    )
    print()
    print(f"emulated on {o['npu']!r}{'cycles':>16}{'ms':>10}{'tokens/s':>11}")
    print(f"{'prefill':<18}{e['prefill_cycles']:>16,}{e['prefill_ms']:>10.2f}{e['prefill_tok_s']:>11.1f}")
    print(f"{'decode':<18}{e['decode_cycles']:>16,}{e['decode_ms']:>10.2f}{e['decode_tok_s']:>11.1f}")
    print(
        f"decode step: {e['decode_cycles_per_token']:,.0f} cycles; DRAM-bandwidth bound "
        f"{e['decode_dram_bound_cycles_per_token']:,.0f} cycles ({e['decode_dram_bytes_per_token'] / 1e6:.1f} MB "
        f"compulsory per token): {e['decode_pct_of_dram_bound']:.1f}% of the bound"
    )
    print()
    print(
        f"peak resident memory: {o['peak_rss_mb']:,.0f} MB after ours, {r['peak_rss_mb_end']:,.0f} MB at the end"
    )


if __name__ == "__main__":
    main()
