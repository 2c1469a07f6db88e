"""Model registry, keyed by config.json's `architectures[0]`.

Adding an architecture is a new file in this folder plus one line here. A model class is a
base.CausalLM: built from (hf_config, attention_backend, max_position) out of the shared layers
(so tensor parallelism splits it), parameters named as the checkpoint names them or, where
projections are fused, naming the checkpoint tensors they hold.
"""
import importlib

_MODELS = {
    "LlamaForCausalLM": ("pagedserve.worker.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("pagedserve.worker.models.mistral", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("pagedserve.worker.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("pagedserve.worker.models.qwen3", "Qwen3ForCausalLM"),
    "OPTForCausalLM": ("pagedserve.worker.models.opt", "OPTForCausalLM"),
    "GPT2LMHeadModel": ("pagedserve.worker.models.gpt2", "GPT2LMHeadModel"),
    "Qwen3MoeForCausalLM": ("pagedserve.worker.models.qwen3_moe", "Qwen3MoeForCausalLM"),
    "Qwen2MoeForCausalLM": ("pagedserve.worker.models.qwen2_moe", "Qwen2MoeForCausalLM"),
    "MixtralForCausalLM": ("pagedserve.worker.models.mixtral", "MixtralForCausalLM"),
    "Phi3ForCausalLM": ("pagedserve.worker.models.phi3", "Phi3ForCausalLM"),
    "DeepseekV3ForCausalLM": ("pagedserve.worker.models.deepseek_v3", "DeepseekV3ForCausalLM"),
}
_MODELS["Gemma2ForCausalLM"] = ("pagedserve.worker.models.gemma2", "Gemma2ForCausalLM")
_MODELS["Gemma3ForCausalLM"] = ("pagedserve.worker.models.gemma3", "Gemma3ForCausalLM")


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def model_class(architecture: str):
    if architecture not in _MODELS:
        raise ValueError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(supported_architectures())}"
        )
    module, name = _MODELS[architecture]
    return getattr(importlib.import_module(module), name)
