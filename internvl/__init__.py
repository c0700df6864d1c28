"""InternVL 2.5 / 3: InternViT, a pixel-shuffle projector and a Qwen2 or Llama language model; transformers' layout
and OpenGVLab's own (``internvl_chat``)."""
from .family import INTERNVL  # noqa: F401  (registers the family)
from .original import INTERNVL_CHAT  # noqa: F401
from .megatron_core import INTERNVL_MCORE  # noqa: F401  (adds megatron-core's LLaVA layout)
