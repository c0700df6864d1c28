"""Qwen2-VL and Qwen2.5-VL: a vision tower, its merger and Qwen2's language model with multimodal rotary embeddings."""
from .family import QWEN2_5_VL, QWEN2_VL  # noqa: F401  (registers the families)
