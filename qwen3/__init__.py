"""Qwen3: Llama with per-head RMSNorm on queries and keys and an explicit head size."""
from .family import QWEN3  # noqa: F401  (registers the family)
