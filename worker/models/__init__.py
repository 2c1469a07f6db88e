"""Model registry, keyed by config.json's `architectures[0]`.

Adding an architecture is a new file in this folder plus one line here. A model class takes
(hf_config, attention_backend, max_position), names its parameters as the checkpoint does, and
offers forward(input_ids, positions, kv_caches, meta) -> hidden, compute_logits(hidden),
kv_cache_shape() and tie_weights().
"""
import importlib

_MODELS = {
    "LlamaForCausalLM": ("worker.models.llama", "LlamaForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def model_class(architecture: str):
    if architecture not in _MODELS:
        raise ValueError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(supported_architectures())}"
        )
    module, name = _MODELS[architecture]
    return getattr(importlib.import_module(module), name)
