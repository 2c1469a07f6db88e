"""Gemma 2 (and Gemma 3's text model, gemma3.py) over a flat varlen batch, as transformers 5.24's
modeling_gemma2.py computes it:

- the embedding scaled by sqrt(hidden_size) (in the model's dtype);
- RMSNorm that multiplies by (1 + weight), in float32 before the cast back;
- four norms per layer: before and after attention, before and after the MLP (the residual adds
  come after the post-norms);
- attention scaled by query_pre_attn_scalar ** -0.5, not head_dim's; its scores soft-capped,
  attn_logit_softcapping * tanh(score / attn_logit_softcapping), in the attention kernels;
- local and global layers (`layer_types`: "sliding_attention" layers attend within
  `sliding_window`; by default every other layer, the first local);
- gelu_pytorch_tanh in the gated MLP; the final logits soft-capped by final_logit_softcapping.

Since some layers attend to the whole context, the scheduler keeps every KV block of a sequence
(CausalLM.kv_sliding_window is None): the simple, correct choice (docs/ARCHITECTURE.md).
"""
import torch
from torch import nn

from pagedserve.worker.distributed import all_reduce
from pagedserve.worker.models.base import CausalLM
from pagedserve.worker.models.llama import LlamaAttention, LlamaVariant
from pagedserve.worker.models.layers import (
    ActAndMul,
    RotaryEmbedding,
    column_shard,
    fused_linear,
    lm_head,
    rope_parameters,
    row_linear,
    vocab_embedding,
)


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + weight): the checkpoint stores weight - 1 (zeros at init)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


class GemmaAttention(LlamaAttention):
    """Llama's attention with Gemma's scale (query_pre_attn_scalar), soft-capped scores and, for
    Gemma 3, (1 + weight) norms over each head's q and k."""

    def __init__(self, config, backend, window: int | None, softcap: float | None, qk_norm: bool):
        bias = config.attention_bias
        super().__init__(config, LlamaVariant(qkv_bias=bias, o_bias=bias), backend, window)
        self.scale = config.query_pre_attn_scalar ** -0.5
        self.softcap = softcap
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)


class GemmaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        gate = column_shard(config.intermediate_size)
        self.gate_up_proj = fused_linear(config.hidden_size, False, gate_proj=gate, up_proj=gate)
        self.down_proj = row_linear(config.intermediate_size, config.hidden_size)
        self.act_and_mul = ActAndMul(config.hidden_activation)

    def forward(self, x):
        return all_reduce(self.down_proj(self.act_and_mul(self.gate_up_proj(x))))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config, backend, window: int | None, softcap: float | None, qk_norm: bool):
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.self_attn = GemmaAttention(config, backend, window, softcap, qk_norm)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.mlp = GemmaMLP(config)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)

    def forward(self, h, rotary, kv_cache, meta):
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), rotary, kv_cache, meta))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


def layer_types(config, default_pattern: int) -> list[str]:
    """config.json's `layer_types`, or transformers' default: every `default_pattern`-th layer
    global (`sliding_window_pattern` in older Gemma 3 configs), the others local."""
    if getattr(config, "layer_types", None):
        return list(config.layer_types)
    pattern = getattr(config, "sliding_window_pattern", None) or default_pattern
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(config.num_hidden_layers)]


class Gemma2ForCausalLM(CausalLM):
    config_defaults = {"hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
                       "attention_bias": False, "head_dim": 256, "query_pre_attn_scalar": 256,
                       "sliding_window": 4096, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
                       "layer_types": None}
    window_pattern = 2  # transformers' default layer_types: local, global, local, ...
    qk_norm = False

    def __init__(self, config, backend, max_position: int):
        super().__init__(config)
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("use_bidirectional_attention (an embedding model's attention) is not supported")
        softcap = self.attention_softcap(config)
        self.model = nn.Module()
        self.model.embed_tokens = vocab_embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(GemmaDecoderLayer(config, backend, w, softcap, self.qk_norm)
                                          for w in self.sliding_windows(config))
        self.model.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = self.rotary_embeddings(config, max_position)
        self.types = layer_types(config, self.window_pattern)
        self.lm_head = lm_head(config.hidden_size, config.vocab_size)
        self.tie_weights()

    @classmethod
    def attention_softcap(cls, config) -> float | None:
        return config.attn_logit_softcapping

    @classmethod
    def sliding_windows(cls, config) -> list[int | None]:
        return [config.sliding_window if t == "sliding_attention" else None
                for t in layer_types(config, cls.window_pattern)]

    def rotary_embeddings(self, config, max_position: int) -> nn.ModuleDict:
        """One rotation for every layer type (Gemma 3 gives each its own base)."""
        rotary = RotaryEmbedding(config.head_dim, max_position, rope_parameters(config))
        return nn.ModuleDict({"sliding_attention": rotary, "full_attention": rotary})

    def input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(self, input_ids, positions, kv_caches, meta) -> torch.Tensor:
        """Hidden states [T, hidden] of every token of the step, before the final norm."""
        h = self.model.embed_tokens(input_ids)
        h = h * torch.tensor(self.config.hidden_size ** 0.5, dtype=h.dtype)
        rotary = {name: r(positions) for name, r in self.rotary.items()}
        for layer, kind, kv_cache in zip(self.model.layers, self.types, kv_caches):
            h = layer(h, rotary[kind], kv_cache, meta)
        return h

    def final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        cap = self.config.final_logit_softcapping
        return logits if not cap else cap * torch.tanh(logits / cap)
