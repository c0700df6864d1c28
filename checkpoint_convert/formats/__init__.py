"""Layer 3, formats: reading and writing checkpoint files, one module per format.

Owns Hugging Face directories (``hf_io``: config, safetensors and ``.bin`` shards, FP8 blocks), Megatron
rank-file trees (``megatron_io``, their key schemas ``megatron_schema`` and ``args`` ``megatron_args``),
``torch_dist`` (``torch_dist`` reads, ``torch_dist_writer`` writes, ``torch_dist_layout`` names the files),
Megatron-Bridge's ``run_config.yaml`` (``bridge_config``), the dispatch over Megatron formats
(``megatron_formats``), loading pickles without running their code (``safe_load``), and the byte sinks every
writer writes through (``sinks``, ``appender``, ``torch_zip_writer``). May import ``base`` and ``model``.
A new file format is one reader (and writer) module here.
"""
