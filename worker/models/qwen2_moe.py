"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): the Qwen2 decoder whose MLPs are sparse mixtures of
experts (moe.py) with a shared expert beside the routed ones, gated per token by
sigmoid(shared_expert_gate(x)).

Which layers are sparse, as transformers decides: layer i unless i is in `mlp_only_layers`, and
only where (i + 1) % `decoder_sparse_step` == 0; the others keep a dense MLP of
`intermediate_size`. `norm_topk_prob` renormalises the top-k weights.
"""
from pagedserve.worker.models.llama import LlamaMLP, LlamaVariant
from pagedserve.worker.models.moe import SparseMoeBlock
from pagedserve.worker.models.qwen2 import Qwen2ForCausalLM

QWEN_MOE_DEFAULTS = {"decoder_sparse_step": 1, "norm_topk_prob": False, "mlp_only_layers": None}


def is_sparse_layer(config, layer: int) -> bool:
    """transformers' Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer rule."""
    return (layer not in (config.mlp_only_layers or []) and config.num_experts > 0
            and (layer + 1) % config.decoder_sparse_step == 0)


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    config_defaults = {**Qwen2ForCausalLM.config_defaults, **QWEN_MOE_DEFAULTS, "qkv_bias": True,
                       "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
                       "shared_expert_intermediate_size": 5632}

    @classmethod
    def variant(cls, config) -> LlamaVariant:
        return LlamaVariant(qkv_bias=config.qkv_bias, o_bias=False)

    def layer_mlp(self, config, variant, layer):
        if not is_sparse_layer(config, layer):
            return None
        shared = LlamaMLP(config, variant, config.shared_expert_intermediate_size, reduce=False)
        return "mlp", SparseMoeBlock(config, config.num_experts, config.num_experts_per_tok,
                                     config.moe_intermediate_size, config.norm_topk_prob,
                                     weights_in_model_dtype=True, shared_expert=shared)

    @classmethod
    def sliding_windows(cls, config) -> list[int | None]:
        """transformers' Qwen2MoeConfig: `layer_types`, else (with `use_sliding_window`) the
        even-indexed layers below `max_window_layers` slide, unlike Qwen2's rule."""
        window = config.sliding_window if config.use_sliding_window else None
        types = config.layer_types or [
            "sliding_attention" if window and (i + 1) % 2 and i < config.max_window_layers else "full_attention"
            for i in range(config.num_hidden_layers)]
        return [window if t == "sliding_attention" else None for t in types]
