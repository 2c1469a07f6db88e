"""Phi-3 (Phi-3/3.5 mini and medium, Phi-4-mini): the Llama decoder whose checkpoint stores q, k
and v as one `qkv_proj` and gate and up as one `gate_up_proj`, with RoPE either plain or
LongRoPE-scaled (`rope_type` longrope, older configs `su`; layers.RotaryEmbedding), over the first
`partial_rotary_factor` of each head's dims (Phi-4-mini: 0.75), the rest passed through.

The fused checkpoint tensors are read as they are, split for tensor parallelism section by section
(a rank's q heads, then its k heads, then its v heads; its gate rows, then its up rows), so a
rank's layout is the one LlamaAttention and LlamaMLP already split and run.
"""
import torch

from pagedserve.worker.models.layers import RotaryEmbedding, heads_linear, rope_parameters
from pagedserve.worker.models.mistral import MistralForCausalLM
from pagedserve.worker.models.sharding import head_split


class Phi3ForCausalLM(MistralForCausalLM):
    # Phi-3-mini-4k sets sliding_window 2047 (MistralForCausalLM.sliding_windows reads it).
    config_defaults = {**MistralForCausalLM.config_defaults, "sliding_window": None, "rms_norm_eps": 1e-5,
                       "original_max_position_embeddings": 4096}

    def __init__(self, config, backend, max_position: int):
        # The RoPE settings as transformers' Phi3Config normalises them, before the decoder reads them.
        config.rope_parameters = phi3_rope_parameters(config)
        super().__init__(config, backend, max_position)
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            heads = config.num_attention_heads
            kv_heads = getattr(config, "num_key_value_heads", None) or heads
            head_split(heads, "num_attention_heads", replicate=False)  # q heads are never replicated
            attn.qkv_proj = heads_linear(config.hidden_size, [heads, kv_heads, kv_heads], attn.head_dim,
                                         replicate=True, what="num_key_value_heads")
            # gate and up as two "heads" sections of width 1: each rank's even slice of both.
            mlp.gate_up_proj = heads_linear(config.hidden_size, [config.intermediate_size] * 2, 1,
                                            what="intermediate_size")
        head_dim = self.model.layers[0].self_attn.head_dim
        rotary_dim = int(head_dim * config.rope_parameters["partial_rotary_factor"])
        if rotary_dim != head_dim:
            self.model.rotary = PartialRotaryEmbedding(rotary_dim, max_position, config.rope_parameters)


class PartialRotaryEmbedding(RotaryEmbedding):
    """RoPE over the first `head_dim` (here: the rotary dims) of each head, the rest passed through,
    as transformers' Phi-3 apply_rotary_pos_emb splits q and k (its frequencies are those of a
    head of rotary_dim dims)."""

    def forward(self, positions: torch.Tensor):
        rotate, rotary_dim = super().forward(positions), self.head_dim

        def partial(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([rotate(x[..., :rotary_dim].contiguous()), x[..., rotary_dim:]], dim=-1)
        return partial


def phi3_rope_parameters(config) -> dict:
    """rope_parameters with what LongRoPE needs beside it: the pretraining context
    (`original_max_position_embeddings`, at the top level in hub configs) and the extended one;
    and `partial_rotary_factor` (top level in hub configs, inside in transformers 5's)."""
    params = rope_parameters(config)
    if params["rope_type"] in ("su", "yarn"):  # Phi-3's earlier names for longrope (as transformers maps them)
        params["rope_type"] = "longrope"
    params.setdefault("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    params.setdefault("original_max_position_embeddings", config.original_max_position_embeddings)
    params.setdefault("max_position_embeddings", config.max_position_embeddings)
    return params
