"""Llama (Llama 2/3, SmolLM2, and anything else `LlamaForCausalLM` in config.json) over a flat
varlen batch: one step's tokens from every sequence, concatenated, shape [T, hidden].

Mistral, Qwen2 and Qwen3 are this same decoder with a few switches (`LlamaVariant`), in their own
files. Module and parameter names mirror Hugging Face's, so a checkpoint's tensors copy in by name,
but for q/k/v and gate/up: one linear each (`qkv_proj`, `gate_up_proj`), which the loader fills
from the checkpoint's separate tensors.
Attention itself is the backend's job: a layer hands it q, k, v, its own KV cache and the step's
metadata, and gets [T, heads, head_dim] back. Under tensor parallelism a layer holds this rank's
heads and hidden units; the two all-reduces are the only lines that know.
"""
from dataclasses import dataclass

import torch
from torch import nn

from pagedserve.worker.distributed import all_reduce
from pagedserve.worker.models.base import CausalLM
from pagedserve.worker.models.layers import (
    ActAndMul,
    RMSNorm,
    RotaryEmbedding,
    column_shard,
    fused_linear,
    heads_shard,
    lm_head,
    rope_parameters,
    row_linear,
    vocab_embedding,
)


@dataclass(frozen=True)
class LlamaVariant:
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k, before the rotation


class LlamaAttention(nn.Module):
    def __init__(self, config, variant: LlamaVariant, backend, window: int | None = None):
        super().__init__()
        self.window = window  # sliding window of this layer, None: full attention
        self.softcap = None  # scores soft-capped at this (Gemma 2), None: not capped
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // total_heads
        self.scale = self.head_dim**-0.5
        hd = self.head_dim
        q = heads_shard([total_heads], hd)
        kv = heads_shard([total_kv_heads], hd, replicate=True, what="num_key_value_heads")
        self.qkv_proj = fused_linear(config.hidden_size, variant.qkv_bias, q_proj=q, k_proj=kv, v_proj=kv)
        self.o_proj = row_linear(total_heads * hd, config.hidden_size, variant.o_bias, what="num_attention_heads * head_dim")
        self.num_heads, self.num_kv_heads = q.length // hd, kv.length // hd  # this rank's
        self.qkv_sizes = [q.length, kv.length, kv.length]
        if variant.qk_norm:
            self.q_norm = RMSNorm(hd, config.rms_norm_eps)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps)
        self.qk_norm = variant.qk_norm
        self.backend = backend

    def forward(self, x, rotary, kv_cache, meta):
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(q), rotary(k)
        out = self.backend.forward(q, k, v, kv_cache, meta, self.scale, self.window, self.softcap)
        return all_reduce(self.o_proj(out.reshape(T, self.num_heads * self.head_dim)))


class LlamaMLP(nn.Module):
    """The gated MLP. `intermediate_size` other than the config's: a MoE model's dense layers or
    shared expert; `reduce=False`: return this rank's partial sum (a shared expert, added to the
    experts' before the MoE layer's one all-reduce)."""

    def __init__(self, config, variant: LlamaVariant, intermediate_size: int | None = None, reduce: bool = True):
        super().__init__()
        intermediate_size = intermediate_size or config.intermediate_size
        gate = column_shard(intermediate_size)
        self.gate_up_proj = fused_linear(config.hidden_size, variant.mlp_bias, gate_proj=gate, up_proj=gate)
        self.down_proj = row_linear(intermediate_size, config.hidden_size, variant.mlp_bias)
        self.act_and_mul = ActAndMul(config.hidden_act)
        self.reduce = reduce

    def forward(self, x):
        out = self.down_proj(self.act_and_mul(self.gate_up_proj(x)))
        return all_reduce(out) if self.reduce else out


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, variant: LlamaVariant, backend, mlp: tuple[str, nn.Module] | None = None,
                 window: int | None = None):
        """`mlp`: (the checkpoint's name for it, the module) where not the dense "mlp" (MoE models);
        `window`: the layer's sliding attention window (None: full attention)."""
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, variant, backend, window)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp_name, module = mlp or ("mlp", LlamaMLP(config, variant))
        setattr(self, self.mlp_name, module)

    def forward(self, h, residual, rotary, kv_cache, meta):
        """(this layer's MLP output, the residual stream before it): the add that joins them is
        the next norm's (one pass with it on the CPU), or the model's after the last layer."""
        if residual is None:
            residual, x = h, self.input_layernorm(h)
        else:
            x, residual = self.input_layernorm(h, residual)
        h = self.self_attn(x, rotary, kv_cache, meta)
        x, residual = self.post_attention_layernorm(h, residual)
        return getattr(self, self.mlp_name)(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config, variant: LlamaVariant, backend, max_position: int, mlp=lambda layer: None,
                 windows: list[int | None] | None = None):
        """`mlp(layer index)`: a layer's (name, MLP module), or None for the dense one; `windows`:
        each layer's sliding window (CausalLM.sliding_windows), None for all full attention."""
        super().__init__()
        self.embed_tokens = vocab_embedding(config.vocab_size, config.hidden_size)
        windows = windows or [None] * config.num_hidden_layers
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, variant, backend, mlp(i), windows[i])
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        head_dim = self.layers[0].self_attn.head_dim
        self.rotary = RotaryEmbedding(head_dim, max_position, rope_parameters(config))

    def forward(self, input_ids, positions, kv_caches, meta):
        h, residual = self.embed_tokens(input_ids), None
        rotary = self.rotary(positions)
        for layer, kv_cache in zip(self.layers, kv_caches):
            h, residual = layer(h, residual, rotary, kv_cache, meta)
        return residual + h


class LlamaForCausalLM(CausalLM):
    config_defaults = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                       "attention_bias": False, "mlp_bias": False}

    def __init__(self, config, backend, max_position: int):
        super().__init__(config)
        variant = self.variant(config)
        self.model = LlamaModel(config, variant, backend, max_position, lambda i: self.layer_mlp(config, variant, i),
                                self.sliding_windows(config))
        self.lm_head = lm_head(config.hidden_size, config.vocab_size)
        self.tie_weights()

    @classmethod
    def variant(cls, config) -> LlamaVariant:
        return LlamaVariant(qkv_bias=config.attention_bias, o_bias=config.attention_bias, mlp_bias=config.mlp_bias)

    def layer_mlp(self, config, variant: LlamaVariant, layer: int) -> tuple[str, nn.Module] | None:
        """Layer `layer`'s MLP (the checkpoint's name for it, the module); None: the dense one."""
        return None

    def input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(self, input_ids, positions, kv_caches, meta) -> torch.Tensor:
        """Hidden states [T, hidden] of every token of the step, before the final norm."""
        return self.model(input_ids, positions, kv_caches, meta)

    def final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.norm(hidden)
