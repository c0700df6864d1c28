"""Make the repository importable from scripts/ and register every model family.

Adding a family is one import line here; FAMILIES (the ``--model`` choices) follows the registry.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpoint_convert.runtime import collector_paused, tune_torch_for_streaming  # noqa: E402  (imports no torch)

tune_torch_for_streaming()
with collector_paused():  # the families import torch
    import megatron_gpt2  # noqa: E402,F401  (registers gpt2)
    import llama  # noqa: E402,F401  (registers llama and mistral)
    import mixtral  # noqa: E402,F401  (registers mixtral)
    import qwen2  # noqa: E402,F401  (registers qwen2)
    import qwen3  # noqa: E402,F401  (registers qwen3)
    import qwen2_moe  # noqa: E402,F401  (registers qwen2_moe)
    import qwen3_moe  # noqa: E402,F401  (registers qwen3_moe)
    from checkpoint_convert.family import registered  # noqa: E402

FAMILIES = tuple(registered())
