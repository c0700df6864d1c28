"""Layer 4, engine: tensors streamed from a source to a target in bounded memory.

Owns opening a source checkpoint as a family and architecture (``sources``), the streaming engine whose
sources produce full Megatron-layout tensors and whose targets split them for the output (``streams``),
the check of every architecture number against the tensors (``shape_check``), whole-tensor passes in
bounded blocks (``blockwise``) and writing on a second thread (``write_behind``). May import ``base``,
``model`` and ``formats``.
"""
