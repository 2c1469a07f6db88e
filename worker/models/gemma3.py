"""Gemma 3's text model (`Gemma3ForCausalLM`: Gemma 3 1B, and the language model of the larger
ones saved alone), as transformers 5.24's modeling_gemma3.py computes it: Gemma 2's decoder
(gemma2.py) with an RMSNorm over each head's q and k before the rotation, five local layers to
one global by default (`sliding_window_pattern` 6), a rope base per layer type (local:
`rope_local_base_freq`, 10,000; global: `rope_theta`, 1,000,000, with `rope_scaling`), and no
attention soft-capping (transformers' Gemma 3 attention passes none, whatever the config says).
"""
from types import SimpleNamespace

from torch import nn

from pagedserve.worker.models.gemma2 import Gemma2ForCausalLM
from pagedserve.worker.models.layers import RotaryEmbedding, rope_parameters


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    config_defaults = {**Gemma2ForCausalLM.config_defaults, "final_logit_softcapping": None,
                       "attn_logit_softcapping": None, "max_position_embeddings": 131072}
    window_pattern = 6
    qk_norm = True

    @classmethod
    def attention_softcap(cls, config) -> float | None:
        return None

    def rotary_embeddings(self, config, max_position: int) -> nn.ModuleDict:
        return nn.ModuleDict({kind: RotaryEmbedding(config.head_dim, max_position, gemma3_rope(config, kind))
                              for kind in ("sliding_attention", "full_attention")})


def gemma3_rope(config, kind: str) -> dict:
    """The rope of a layer type: transformers 5 writes `rope_parameters` keyed by layer type;
    older config.json files `rope_theta` and `rope_scaling` (global layers) and
    `rope_local_base_freq` (local layers)."""
    params = getattr(config, "rope_parameters", None) or {}
    if kind in params:
        return rope_parameters(SimpleNamespace(rope_parameters=params[kind]))
    if kind == "sliding_attention":
        return {"rope_type": "default", "rope_theta": getattr(config, "rope_local_base_freq", None) or 10000.0}
    theta = getattr(config, "rope_theta", None) or 1_000_000.0
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    scaling.setdefault("rope_type", scaling.pop("type", "default"))
    return {**scaling, "rope_theta": theta}
