"""Qwen2 (and Qwen2.5): the Llama decoder with biases on the q, k and v projections (not on o).

Its sliding window is off unless `use_sliding_window`; where on, it applies to the layers that
`layer_types` names "sliding_attention" (transformers' default: those from `max_window_layers` on).
"""
from pagedserve.worker.models.llama import LlamaForCausalLM, LlamaVariant


class Qwen2ForCausalLM(LlamaForCausalLM):
    config_defaults = {**LlamaForCausalLM.config_defaults, "use_sliding_window": False, "sliding_window": None,
                       "max_window_layers": 28, "layer_types": None}

    @classmethod
    def variant(cls, config) -> LlamaVariant:
        return LlamaVariant(qkv_bias=True, o_bias=False)

    @classmethod
    def sliding_windows(cls, config) -> list[int | None]:
        """As transformers' Qwen2Config and Qwen3Config derive them."""
        window = config.sliding_window if config.use_sliding_window else None
        types = config.layer_types or ["sliding_attention" if window is not None and i >= config.max_window_layers
                                       else "full_attention" for i in range(config.num_hidden_layers)]
        return [window if t == "sliding_attention" else None for t in types]
