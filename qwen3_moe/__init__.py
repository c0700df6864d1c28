"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3 attention (query/key norms) and routed experts."""
from .family import QWEN3_MOE  # noqa: F401  (registers the family)
