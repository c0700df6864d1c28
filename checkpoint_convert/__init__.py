"""Family-agnostic machinery for converting checkpoints between Megatron-LM and Hugging Face.

The core knows Megatron's file layout, key schemas and parallel styles, and Hugging Face's file
layout; it never names a model family. Families are the top-level packages with a ``family.py``
(found by :mod:`checkpoint_convert.entry`); each registers a :class:`~checkpoint_convert.family.FamilySpec`
describing its tensors declaratively.
"""
