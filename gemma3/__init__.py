"""Gemma3 on the emulated NPU, behind Optimum RBLN's API.

from gemma3 import RBLNGemma3ForCausalLM          # or NPUGemma3ForCausalLM
model = RBLNGemma3ForCausalLM.from_pretrained("gemma3-dir", rbln_max_seq_len=512)
"""

from .modeling import NPUGemma3ForCausalLM, RBLNGemma3ForCausalLM
from .rbln_config import NPUGemma3ForCausalLMConfig, RBLNGemma3ForCausalLMConfig

__all__ = [
    "NPUGemma3ForCausalLM",
    "NPUGemma3ForCausalLMConfig",
    "RBLNGemma3ForCausalLM",
    "RBLNGemma3ForCausalLMConfig",
]
