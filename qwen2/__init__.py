"""Qwen2 and Qwen2.5: Llama with biases on q, k and v, and sliding windows on chosen layers."""
from .family import QWEN2  # noqa: F401  (registers the family)
