"""GPT-2: Megatron-LM GPT models <-> Hugging Face ``GPT2LMHeadModel``."""
from .family import GPT2  # noqa: F401  (registers the family)
