"""Tiled kernels for the emulated NPU, each with its NumPy reference beside it.

One module per op family; each exports ``Kernel`` objects (``emit`` the tiled program, ``fast``
the whole-operator math, ``reference`` the plain NumPy definition).
"""

from __future__ import annotations

from npu_emulator import Kernel

from .attention_decode import attention_decode
from .attention_decode_flash import attention_decode_flash
from .attention_prefill import attention_prefill
from .embedding import embedding
from .kvcache import kv_cache_write
from .lm_head import lm_head
from .lora import geglu_combine, lora
from .matmul import linear, matmul
from .mlp import geglu_mlp, siglip_mlp
from .norms import layernorm, rmsnorm
from .rope import rope
from .softmax import softmax
from .vision import mm_projector, patch_embed

ALL: tuple[Kernel, ...] = (
    matmul,
    linear,
    geglu_mlp,
    siglip_mlp,
    rmsnorm,
    layernorm,
    rope,
    softmax,
    attention_prefill,
    attention_decode,
    attention_decode_flash,
    kv_cache_write,
    embedding,
    lm_head,
    lora,
    geglu_combine,
    patch_embed,
    mm_projector,
)


def registry() -> dict[str, Kernel]:
    """Every kernel of the library by name (saved plans refer to kernels by name)."""
    return {k.name: k for k in ALL}


__all__ = [k.name for k in ALL] + ["ALL", "registry"]
