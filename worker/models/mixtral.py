"""Mixtral: the Mistral decoder whose every MLP is a sparse mixture of `num_local_experts` experts
(moe.py), top `num_experts_per_tok` always renormalised, their weights applied in float32 (as
transformers' MixtralTopKRouter). The checkpoint names the layer `block_sparse_moe` and each
expert's projections w1 (gate), w3 (up) and w2 (down)."""
from pagedserve.worker.models.mistral import MistralForCausalLM
from pagedserve.worker.models.moe import SparseMoeBlock


class MixtralForCausalLM(MistralForCausalLM):
    config_defaults = {**MistralForCausalLM.config_defaults, "sliding_window": None, "rms_norm_eps": 1e-5,
                       "num_local_experts": 8, "num_experts_per_tok": 2}

    def layer_mlp(self, config, variant, layer):
        return "block_sparse_moe", SparseMoeBlock(
            config, config.num_local_experts, config.num_experts_per_tok, config.intermediate_size,
            renormalize=True, weights_in_model_dtype=False, names=("w1", "w3", "w2"))
