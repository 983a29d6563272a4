"""Gemma3 on the emulated NPU (the text and image models arrive with their issues)."""
