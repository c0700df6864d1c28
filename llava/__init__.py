"""LLaVA: a CLIP or SigLIP vision tower, a two-layer projector and a Llama, Mistral or Qwen2 language model."""
from .family import LLAVA  # noqa: F401  (registers the family)
from .megatron_core import LLAVA_MCORE  # noqa: F401  (adds megatron-core's LLaVA layout)
