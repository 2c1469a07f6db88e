"""Qwen3: the Llama decoder with an RMSNorm over each head's q and k before the rotation."""
from pagedserve.worker.models.llama import LlamaVariant
from pagedserve.worker.models.qwen2 import Qwen2ForCausalLM


class Qwen3ForCausalLM(Qwen2ForCausalLM):
    @classmethod
    def variant(cls, config) -> LlamaVariant:
        return LlamaVariant(qkv_bias=config.attention_bias, o_bias=config.attention_bias, qk_norm=True)
