"""Llama 1/2/3 and Mistral: Megatron-LM GPT models with RMSNorm, SwiGLU and rotary embeddings."""
from .family import LLAMA, MISTRAL  # noqa: F401  (registers the families)
