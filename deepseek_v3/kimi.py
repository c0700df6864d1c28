"""Kimi-K2 (``model_type: kimi_k2``): DeepSeek-V3's architecture under a model type transformers has no class for
(its releases ship DeepSeek's own modeling code, ``auto_map``). Read as DeepSeek-V3; written back with the source's
``model_type``, ``architectures`` and the config keys transformers' ``DeepseekV3Config`` does not know (``auto_map``,
DeepSeek's ``topk_method`` / ``scoring_func`` ...), carried in the architecture's ``extra`` as one entry.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

from checkpoint_convert.model import BadInputError, transformers_attr

KIMI_MODEL_TYPES = ("kimi_k2",)
SOURCE_CONFIG = "hf_source_config"  # the ``extra`` entry: model_type, architectures, keys DeepseekV3Config lacks
# not carried: the output's own (dequantized weights, its dtype, its transformers version)
_NOT_CARRIED = {"model_type", "quantization_config", "transformers_version", "_name_or_path", "torch_dtype", "dtype"}
# DeepSeek's own code's routing keys: transformers' DeepseekV3 router is theirs with these values
_ROUTING = {"topk_method": "noaux_tc", "scoring_func": "sigmoid"}


def _values(cfg: Any) -> dict[str, Any]:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))


@lru_cache(maxsize=None)
def _known_keys() -> frozenset[str]:
    return frozenset(transformers_attr("DeepseekV3Config")().to_dict())


def source_config(cfg: Any) -> dict[str, Any]:
    """The ``extra`` entry of a config that is DeepSeek-V3 under another model type; empty for DeepSeek-V3's own."""
    model_type = getattr(cfg, "model_type", None)
    if model_type not in KIMI_MODEL_TYPES:
        return {}
    values = _values(cfg)
    for key, wanted in _ROUTING.items():
        if values.get(key, wanted) != wanted:
            raise BadInputError(f"{key} is {values[key]!r}: a {model_type} model routes as DeepSeek-V3 ({key} {wanted})")
    carried = {key: value for key, value in values.items()
               if key not in _known_keys() and key not in _NOT_CARRIED and value is not None}
    return {SOURCE_CONFIG: {"model_type": model_type, "architectures": values.get("architectures"), **carried}}


@lru_cache(maxsize=None)
def config_class(model_type: str) -> type:
    """``DeepseekV3Config`` under ``model_type``, registered with transformers' Auto classes (with
    ``DeepseekV3ForCausalLM``) in this process, so the output is checked against DeepSeek-V3's model."""
    base, model = transformers_attr("DeepseekV3Config"), transformers_attr("DeepseekV3ForCausalLM")
    cls = type(f"{model_type.title().replace('_', '')}Config", (base,), {"model_type": model_type})
    transformers_attr("AutoConfig").register(model_type, cls, exist_ok=True)
    model_cls = type(f"{model_type.title().replace('_', '')}ForCausalLM", (model,), {"config_class": cls})
    transformers_attr("AutoModelForCausalLM").register(cls, model_cls, exist_ok=True)
    return cls


def source_config_kwargs(extra: dict[str, Any]) -> tuple[type | None, dict[str, Any]]:
    """(config class or None for DeepSeek-V3's own, keyword arguments) of a recorded source config."""
    recorded = extra.get(SOURCE_CONFIG)
    if not recorded:
        return None, {}
    kwargs = {key: value for key, value in recorded.items() if key != "model_type"}
    return config_class(recorded["model_type"]), kwargs
