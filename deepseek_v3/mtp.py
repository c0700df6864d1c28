"""DeepSeek-V3's multi-token prediction (MTP) layers in Hugging Face's layout (GLM-4.5 stores them the same way).

Layer ``i`` is stored as decoder layer ``num_hidden_layers + i`` (``num_nextn_predict_layers`` of them): a whole
decoder layer plus

| Hugging Face (``model.layers.{N+i}.``) | megatron-core (``mtp.layers.i.``) |
| --- | --- |
| ``enorm`` (norm of the next token's embedding) | ``enorm`` |
| ``hnorm`` (norm of the main model's last hidden state) | ``hnorm`` |
| ``eh_proj`` [hidden, 2 x hidden], input [embedding; hidden] | ``eh_proj`` (column-parallel), same input order |
| ``shared_head.norm`` | ``final_layernorm`` |
| ``embed_tokens``, ``shared_head.head`` | the main ``embedding`` and ``output_layer`` (shared) |
"""
from __future__ import annotations

from checkpoint_convert.model import ModelArch, Param, Style


def _tied(arch: ModelArch) -> bool:
    return arch.tie_embeddings


def _untied(arch: ModelArch) -> bool:
    return not arch.tie_embeddings


MTP_HEAD = (
    Param("enorm.weight", ("enorm.weight",), Style.REPLICATED),
    Param("hnorm.weight", ("hnorm.weight",), Style.REPLICATED),
    Param("eh_proj.weight", ("eh_proj.weight",), Style.COLUMN),
    Param("final_layernorm.weight", ("shared_head.norm.weight",), Style.REPLICATED),
    Param("embedding.word_embeddings.weight", ("embed_tokens.weight",), Style.VOCAB, shared=True),
    Param("output_layer.weight", ("shared_head.head.weight",), Style.VOCAB, shared=True, when=_untied),
    Param("embedding.word_embeddings.weight", ("shared_head.head.weight",), Style.VOCAB, shared=True, when=_tied),
)


def mtp_config_kwargs(arch: ModelArch) -> dict[str, int]:
    """``num_nextn_predict_layers``: the MTP layers converted; without any, what the source's config said."""
    return {"num_nextn_predict_layers": arch.mtp_num_layers} if arch.mtp_num_layers else {}
