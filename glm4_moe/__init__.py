"""GLM-4.5 and GLM-4.5-Air (transformers' Glm4MoeForCausalLM): Llama-shaped attention, DeepSeek-V3's experts."""
from .family import GLM4_MOE  # noqa: F401  (registers the family)
