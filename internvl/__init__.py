"""InternVL 2.5 / 3: InternViT, a pixel-shuffle projector and a Qwen2 or Llama language model."""
from .family import INTERNVL  # noqa: F401  (registers the family)
