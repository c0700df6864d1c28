"""Mixtral: Llama attention plus a top-k router and SwiGLU experts (expert parallel)."""
from .family import MIXTRAL  # noqa: F401  (registers the family)
