"""Make the repository importable from scripts/ and register every model family."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpoint_convert.runtime import collector_paused, tune_torch_for_streaming  # noqa: E402  (imports no torch)

tune_torch_for_streaming()
with collector_paused():  # the families import torch
    import megatron_gpt2  # noqa: E402,F401  (registers gpt2)
    import llama  # noqa: E402,F401  (registers llama and mistral)
    import mixtral  # noqa: E402,F401  (registers mixtral)

FAMILIES = ("gpt2", "llama", "mistral", "mixtral")
