"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2 attention, routed experts and a gated shared expert."""
from .family import QWEN2_MOE  # noqa: F401  (registers the family)
