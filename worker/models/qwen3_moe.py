"""Qwen3-MoE (Qwen3-30B-A3B, -235B-A22B): the Qwen3 decoder (q/k norms) whose MLPs are sparse
mixtures of experts (moe.py), no shared expert; which layers are sparse and `norm_topk_prob` as
in Qwen2-MoE (qwen2_moe.is_sparse_layer)."""
from pagedserve.worker.models.moe import SparseMoeBlock
from pagedserve.worker.models.qwen2_moe import QWEN_MOE_DEFAULTS, is_sparse_layer
from pagedserve.worker.models.qwen3 import Qwen3ForCausalLM


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    config_defaults = {**Qwen3ForCausalLM.config_defaults, **QWEN_MOE_DEFAULTS,
                       "num_experts_per_tok": 8, "moe_intermediate_size": 768}
    # Hub checkpoints write num_experts; transformers 5 saves it as num_local_experts (attribute_map).
    config_aliases = {"num_experts": "num_local_experts"}

    def layer_mlp(self, config, variant, layer):
        if not is_sparse_layer(config, layer):
            return None
        return "mlp", SparseMoeBlock(config, config.num_experts, config.num_experts_per_tok,
                                     config.moe_intermediate_size, config.norm_topk_prob,
                                     weights_in_model_dtype=True)

    @classmethod
    def sliding_windows(cls, config) -> list[int | None]:
        """transformers' Qwen3Moe attention: `sliding_window` on every layer when
        `use_sliding_window` (no layer_types, unlike Qwen3)."""
        return [config.sliding_window if config.use_sliding_window else None] * config.num_hidden_layers
