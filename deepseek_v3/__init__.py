"""DeepSeek-V3 and DeepSeek-V2: multi-latent attention (one table, two transformers config classes)."""
from .family import DEEPSEEK_V2, DEEPSEEK_V3  # noqa: F401  (registers the families)
