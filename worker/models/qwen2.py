"""Qwen2 (and Qwen2.5): the Llama decoder with biases on the q, k and v projections (not on o).

Its sliding window is off unless `use_sliding_window`; where on, the loader caps the context at it.
"""
from pagedserve.worker.models.llama import LlamaForCausalLM, LlamaVariant


class Qwen2ForCausalLM(LlamaForCausalLM):
    config_defaults = {**LlamaForCausalLM.config_defaults, "use_sliding_window": False, "sliding_window": None}

    @classmethod
    def variant(cls, config) -> LlamaVariant:
        return LlamaVariant(qkv_bias=True, o_bias=False)

    @classmethod
    def attention_window(cls, config) -> int | None:
        return config.sliding_window if config.use_sliding_window else None
