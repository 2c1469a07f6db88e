"""GPT-2: learned positions, LayerNorm, a GELU MLP, and its weights stored as Conv1D, [in, out]:
the loader transposes them as it reads (the layers are marked `transposed`). The q, k and v
projections are one fused c_attn, split under tensor parallelism section by section.
"""
import torch
from torch import nn

from pagedserve.worker.distributed import all_reduce
from pagedserve.worker.models.base import CausalLM
from pagedserve.worker.models.layers import (
    activation,
    column_linear,
    heads_linear,
    lm_head,
    position_embedding,
    row_linear,
    vocab_embedding,
)


class GPT2Attention(nn.Module):
    def __init__(self, config, layer_index: int, backend):
        super().__init__()
        heads, hidden = config.num_attention_heads, config.hidden_size
        self.head_dim = hidden // heads
        self.scale = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_index + 1
        self.c_attn = heads_linear(hidden, [heads, heads, heads], self.head_dim, bias=True, transposed=True, what="n_head")
        self.c_proj = row_linear(hidden, hidden, bias=True, transposed=True, what="n_embd")
        self.num_heads = self.num_kv_heads = self.c_attn.out_features // (3 * self.head_dim)  # this rank's
        self.backend = backend

    def forward(self, x, kv_cache, meta):
        T = x.shape[0]
        q, k, v = (t.view(T, self.num_heads, self.head_dim) for t in self.c_attn(x).chunk(3, dim=-1))
        out = self.backend.forward(q, k, v, kv_cache, meta, self.scale)
        return all_reduce(self.c_proj(out.reshape(T, -1)))


class GPT2MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        inner = config.n_inner or 4 * config.hidden_size
        self.c_fc = column_linear(config.hidden_size, inner, bias=True, transposed=True, what="n_inner")
        self.c_proj = row_linear(inner, config.hidden_size, bias=True, transposed=True, what="n_inner")
        self.act = activation(config.activation_function)

    def forward(self, x):
        return all_reduce(self.c_proj(self.act(self.c_fc(x))))


class GPT2Block(nn.Module):
    def __init__(self, config, layer_index: int, backend):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.attn = GPT2Attention(config, layer_index, backend)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = GPT2MLP(config)

    def forward(self, h, kv_cache, meta):
        h = h + self.attn(self.ln_1(h), kv_cache, meta)
        return h + self.mlp(self.ln_2(h))


class GPT2Model(nn.Module):
    def __init__(self, config, backend):
        super().__init__()
        self.wte = vocab_embedding(config.vocab_size, config.hidden_size)
        self.wpe = position_embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, i, backend) for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(self, input_ids, positions, kv_caches, meta):
        h = self.wte(input_ids) + self.wpe(positions)
        for block, kv_cache in zip(self.h, kv_caches):
            h = block(h, kv_cache, meta)
        return h


class GPT2LMHeadModel(CausalLM):
    config_defaults = {"activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "n_inner": None,
                       "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                       "tie_word_embeddings": True}
    config_aliases = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                      "max_position_embeddings": "n_positions"}
    checkpoint_prefix = "transformer."

    def __init__(self, config, backend, max_position: int):
        super().__init__(config)
        self.transformer = GPT2Model(config, backend)
        self.lm_head = lm_head(config.hidden_size, config.vocab_size)
        self.tie_weights()

    def input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def forward(self, input_ids, positions, kv_caches, meta) -> torch.Tensor:
        return self.transformer(input_ids, positions, kv_caches, meta)

    def final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.transformer.ln_f(hidden)
