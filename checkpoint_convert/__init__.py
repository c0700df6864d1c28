"""Family-agnostic machinery for converting checkpoints between Megatron-LM and Hugging Face.

The core knows Megatron's file layout, key schemas and parallel styles, and Hugging Face's file
layout; it never names a model family. Families are the top-level packages with a ``family.py``
(found by :mod:`checkpoint_convert.commands.entry`); each registers a
:class:`~checkpoint_convert.model.family.FamilySpec` describing its tensors declaratively, using only the
names :mod:`checkpoint_convert.model` exports.

The core is six layers, one subpackage each, listed in ``LAYERS`` from the bottom up. A module imports
only from its own layer and the layers below it, and no import circle exists anywhere in the package
(``tests/test_layers.py`` checks both, counting imports inside functions and under ``TYPE_CHECKING``);
``docs/architecture.md`` describes what each layer owns.
"""

LAYERS = ("base", "model", "formats", "engine", "run", "commands")
