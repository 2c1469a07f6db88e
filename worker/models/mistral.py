"""Mistral: the Llama decoder with a sliding attention window on every layer (Mistral 7B v0.1: 4096
tokens; later checkpoints set `sliding_window: null`). The scheduler releases the KV blocks that
fall behind the window (docs/ARCHITECTURE.md, "Sliding windows").
"""
from pagedserve.worker.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    config_defaults = {**LlamaForCausalLM.config_defaults, "sliding_window": 4096}

    @classmethod
    def sliding_windows(cls, config) -> list[int | None]:
        return [config.sliding_window] * config.num_hidden_layers
