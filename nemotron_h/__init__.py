"""Nemotron-H: hybrid Mamba-2 / attention / MLP / expert models (megatron-core's MambaModel)."""
from .family import NEMOTRON_H  # noqa: F401  (registers the family)
