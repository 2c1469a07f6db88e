"""Mistral: the Llama decoder with a sliding attention window (Mistral 7B v0.1: 4096 tokens).

The attention backends attend to the whole context, so the loader caps the context at the window,
where sliding and full attention agree (later Mistral checkpoints set `sliding_window: null`).
"""
from pagedserve.worker.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    config_defaults = {**LlamaForCausalLM.config_defaults, "sliding_window": 4096}

    @classmethod
    def attention_window(cls, config) -> int | None:
        return config.sliding_window
