"""Family-agnostic machinery for converting checkpoints between Megatron-LM and Hugging Face.

The core knows Megatron's file layout, key schemas and parallel styles, and Hugging Face's file
layout; it never names a model family. Families (``megatron_gpt2``, ``llama``, ``mixtral``) register
a :class:`~checkpoint_convert.family.FamilySpec` describing their tensors declaratively.
"""
