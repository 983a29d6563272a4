"""Gemma3 on the emulated NPU, behind Optimum RBLN's API.

from gemma3 import RBLNGemma3ForCausalLM          # or NPUGemma3ForCausalLM
model = RBLNGemma3ForCausalLM.from_pretrained("gemma3-dir", rbln_max_seq_len=512)

from gemma3 import RBLNGemma3ForConditionalGeneration   # image+text; or NPUGemma3ForConditionalGeneration
model = RBLNGemma3ForConditionalGeneration.from_pretrained("gemma3-4b-dir")

from gemma3 import RBLNAutoModelForImageTextToText       # the class picked from the directory
"""

from .auto import RBLNAutoConfig, RBLNAutoModelForCausalLM, RBLNAutoModelForImageTextToText
from .facade import NPUGemma3ForCausalLM, RBLNGemma3ForCausalLM
from .lora import RBLNLoRAAdapterConfig, RBLNLoRAConfig
from .multimodal import NPUGemma3ForConditionalGeneration, RBLNGemma3ForConditionalGeneration
from .processor import Gemma3Processor
from .rbln_config import (
    NPUGemma3ForCausalLMConfig,
    NPUGemma3ForConditionalGenerationConfig,
    NPUSiglipVisionModelConfig,
    RBLNGemma3ForCausalLMConfig,
    RBLNGemma3ForConditionalGenerationConfig,
    RBLNSiglipVisionModelConfig,
)

__all__ = [
    "Gemma3Processor",
    "NPUGemma3ForCausalLM",
    "NPUGemma3ForCausalLMConfig",
    "NPUGemma3ForConditionalGeneration",
    "NPUGemma3ForConditionalGenerationConfig",
    "NPUSiglipVisionModelConfig",
    "RBLNAutoConfig",
    "RBLNAutoModelForCausalLM",
    "RBLNAutoModelForImageTextToText",
    "RBLNGemma3ForCausalLM",
    "RBLNGemma3ForCausalLMConfig",
    "RBLNGemma3ForConditionalGeneration",
    "RBLNGemma3ForConditionalGenerationConfig",
    "RBLNLoRAAdapterConfig",
    "RBLNLoRAConfig",
    "RBLNSiglipVisionModelConfig",
]
