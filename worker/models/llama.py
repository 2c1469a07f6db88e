"""Llama (Llama 2/3, SmolLM2, and anything else `LlamaForCausalLM` in config.json) over a flat
varlen batch: one step's tokens from every sequence, concatenated, shape [T, hidden].

Module and parameter names mirror Hugging Face's, so a checkpoint's tensors copy in by name.
Attention itself is the backend's job: a layer hands it q, k, v, its own KV cache and the step's
metadata, and gets [T, heads, head_dim] back.
"""
import torch
from torch import nn

from worker.models.layers import (
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    column_linear,
    rope_parameters,
    row_linear,
    silu_and_mul,
    vocab_embedding,
)


class LlamaAttention(nn.Module):
    def __init__(self, config, backend):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        bias = getattr(config, "attention_bias", False)
        self.q_proj = column_linear(config.hidden_size, self.num_heads * self.head_dim, bias)
        self.k_proj = column_linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias)
        self.v_proj = column_linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias)
        self.o_proj = row_linear(self.num_heads * self.head_dim, config.hidden_size, bias)
        self.backend = backend

    def forward(self, x, cos, sin, kv_cache, meta):
        T = x.shape[0]
        q = apply_rotary(self.q_proj(x).view(T, self.num_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(T, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(T, self.num_kv_heads, self.head_dim)
        out = self.backend.forward(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj(out.reshape(T, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_proj = column_linear(config.hidden_size, config.intermediate_size, bias)
        self.up_proj = column_linear(config.hidden_size, config.intermediate_size, bias)
        self.down_proj = row_linear(config.intermediate_size, config.hidden_size, bias)

    def forward(self, x):
        return self.down_proj(silu_and_mul(self.gate_proj(x), self.up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, backend):
        super().__init__()
        eps = getattr(config, "rms_norm_eps", 1e-6)
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.self_attn = LlamaAttention(config, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.mlp = LlamaMLP(config)

    def forward(self, h, cos, sin, kv_cache, meta):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, kv_cache, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, config, backend, max_position: int):
        super().__init__()
        self.embed_tokens = vocab_embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, backend) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, getattr(config, "rms_norm_eps", 1e-6))
        head_dim = self.layers[0].self_attn.head_dim
        self.rotary = RotaryEmbedding(head_dim, max_position, rope_parameters(config))

    def forward(self, input_ids, positions, kv_caches, meta):
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, h.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            h = layer(h, cos, sin, kv_cache, meta)
        return h


class LlamaForCausalLM(nn.Module):
    def __init__(self, config, backend, max_position: int):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, backend, max_position)
        self.lm_head = column_linear(config.hidden_size, config.vocab_size)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when the checkpoint does (it then stores one tensor).
        Called again by the loader: moving a model off the meta device unties parameters."""
        if getattr(self.config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, positions, kv_caches, meta) -> torch.Tensor:
        """Hidden states [T, hidden] of every token of the step, before the final norm."""
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] in float32 for the N positions that sample (the norm is per row, so
        skipping the rest changes nothing)."""
        return self.lm_head(self.model.norm(hidden)).float()

    def kv_cache_shape(self) -> tuple[int, int, int]:
        """(num_layers, num_kv_heads, head_dim): what the KV cache allocator needs."""
        attn = self.model.layers[0].self_attn
        return len(self.model.layers), attn.num_kv_heads, attn.head_dim
