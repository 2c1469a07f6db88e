"""OPT (Meta's 2022 decoders, facebook/opt-125m ... 66b): learned positions, LayerNorm, ReLU MLP,
biases everywhere. opt-350m normalises after each block instead of before, and embeds in a
smaller width with projections in and out; both are switches of config.json. q, k and v run as
one linear (`qkv_proj`), which the loader fills from the checkpoint's three.
"""
import torch
from torch import nn

from pagedserve.worker.distributed import all_reduce
from pagedserve.worker.models.base import CausalLM
from pagedserve.worker.models.layers import (
    activation,
    column_linear,
    fused_linear,
    heads_shard,
    lm_head,
    position_embedding,
    row_linear,
    vocab_embedding,
)

POSITION_OFFSET = 2  # OPT's position table starts two rows in (a relic of fairseq's padding)


class OPTAttention(nn.Module):
    def __init__(self, config, backend):
        super().__init__()
        heads, hidden, bias = config.num_attention_heads, config.hidden_size, config.enable_bias
        self.head_dim = hidden // heads
        self.scale = self.head_dim**-0.5
        split = heads_shard([heads], self.head_dim)
        self.qkv_proj = fused_linear(hidden, bias, q_proj=split, k_proj=split, v_proj=split)
        self.out_proj = row_linear(hidden, hidden, bias, what="hidden_size")
        self.num_heads = self.num_kv_heads = split.length // self.head_dim  # this rank's
        self.backend = backend

    def forward(self, x, kv_cache, meta):
        T = x.shape[0]
        q, k, v = (t.view(T, self.num_heads, self.head_dim) for t in self.qkv_proj(x).chunk(3, dim=-1))
        out = self.backend.forward(q, k, v, kv_cache, meta, self.scale)
        return all_reduce(self.out_proj(out.reshape(T, -1)))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config, backend):
        super().__init__()
        hidden, affine = config.hidden_size, config.layer_norm_elementwise_affine
        self.self_attn = OPTAttention(config, backend)
        self.self_attn_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)
        self.fc1 = column_linear(hidden, config.ffn_dim, config.enable_bias, what="ffn_dim")
        self.fc2 = row_linear(config.ffn_dim, hidden, config.enable_bias, what="ffn_dim")
        self.final_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)
        self.act = activation(config.activation_function)
        self.norm_first = config.do_layer_norm_before

    def forward(self, h, kv_cache, meta):
        if self.norm_first:
            h = h + self.self_attn(self.self_attn_layer_norm(h), kv_cache, meta)
            return h + self.mlp(self.final_layer_norm(h))
        h = self.self_attn_layer_norm(h + self.self_attn(h, kv_cache, meta))
        return self.final_layer_norm(h + self.mlp(h))

    def mlp(self, x):
        return all_reduce(self.fc2(self.act(self.fc1(x))))


class OPTDecoder(nn.Module):
    def __init__(self, config, backend):
        super().__init__()
        hidden, width = config.hidden_size, config.word_embed_proj_dim or config.hidden_size
        self.embed_tokens = vocab_embedding(config.vocab_size, width)
        self.embed_positions = position_embedding(config.max_position_embeddings + POSITION_OFFSET, hidden)
        self.project_in = nn.Linear(width, hidden, bias=False) if width != hidden else None
        self.project_out = nn.Linear(hidden, width, bias=False) if width != hidden else None
        has_final_norm = config.do_layer_norm_before and not config._remove_final_layer_norm
        self.final_layer_norm = (
            nn.LayerNorm(hidden, elementwise_affine=config.layer_norm_elementwise_affine) if has_final_norm else None
        )
        self.layers = nn.ModuleList(OPTDecoderLayer(config, backend) for _ in range(config.num_hidden_layers))

    def forward(self, input_ids, positions, kv_caches, meta):
        h = self.embed_tokens(input_ids)
        if self.project_in is not None:
            h = self.project_in(h)
        h = h + self.embed_positions(positions + POSITION_OFFSET)
        for layer, kv_cache in zip(self.layers, kv_caches):
            h = layer(h, kv_cache, meta)
        return h


class OPTModel(nn.Module):
    def __init__(self, config, backend):
        super().__init__()
        self.decoder = OPTDecoder(config, backend)


class OPTForCausalLM(CausalLM):
    config_defaults = {"activation_function": "relu", "do_layer_norm_before": True, "_remove_final_layer_norm": False,
                       "enable_bias": True, "layer_norm_elementwise_affine": True, "word_embed_proj_dim": None,
                       "tie_word_embeddings": True}

    def __init__(self, config, backend, max_position: int):
        super().__init__(config)
        self.model = OPTModel(config, backend)
        self.lm_head = lm_head(config.word_embed_proj_dim or config.hidden_size, config.vocab_size)
        self.tie_weights()

    def input_embeddings(self) -> nn.Embedding:
        return self.model.decoder.embed_tokens

    def forward(self, input_ids, positions, kv_caches, meta) -> torch.Tensor:
        return self.model.decoder(input_ids, positions, kv_caches, meta)

    def final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        decoder = self.model.decoder
        if decoder.final_layer_norm is not None:
            hidden = decoder.final_layer_norm(hidden)
        return hidden if decoder.project_out is None else decoder.project_out(hidden)
