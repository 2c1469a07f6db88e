"""DeepSeek V3 (and V3's layout in V2/R1-style configs): multi-head latent attention (MLA), a
mixture of experts with grouped top-k sigmoid routing and always-on shared experts, the first
`first_k_dense_replace` layers dense (DeepSeek-V3 technical report, 2024; transformers'
modeling_deepseek_v3).

MLA here is the *expanded* form: the compressed latent (kv_a_proj_with_mqa, then kv_a_layernorm)
is projected back up to per-head keys and values (kv_b_proj) before the paged cache, so the cache
holds ordinary heads, [qk_nope + qk_rope] wide, V zero-padded to that width (the attention output's
padding is dropped). Correct, but it keeps num_heads heads per token where the latent form keeps
one latent of kv_lora_rank + qk_rope_head_dim: the memory saving of MLA is not taken.

The rotary part of q and k (qk_rope_head_dim of each head; k's is one head shared by all) is
rotated by plain RoPE; `rope_interleave` (V3's checkpoints) pairs dims (0, 1), (2, 3), ...: they
are de-interleaved to the half-split layout first, the same permutation for q and k, which leaves
q . k as transformers computes it. RoPE is plain or `yarn` (the released V3/R1 checkpoints), whose
mscale also scales the softmax (attention_mscale).

Routing (DeepseekV3TopkRouter): sigmoid scores in float32, `e_score_correction_bias` added for
the choice only, experts in `n_group` groups of which the `topk_group` with the largest sum of
their top-2 scores are eligible, the top_k eligible experts chosen, their (uncorrected) scores
renormalised when `norm_topk_prob` and scaled by `routed_scaling_factor`.
"""
import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.worker.distributed import all_reduce
from pagedserve.worker.models.layers import (RMSNorm, RotaryEmbedding, heads_linear, rope_parameters, row_linear,
                                             yarn_mscale)
from pagedserve.worker.models.llama import LlamaForCausalLM, LlamaMLP, LlamaVariant
from pagedserve.worker.models.moe import FusedExperts

_LATENT_NORM_EPS = 1e-6  # transformers builds q_a_layernorm and kv_a_layernorm with its RMSNorm's default


def grouped_topk_route(logits: torch.Tensor, bias: torch.Tensor, num_groups: int, topk_groups: int, top_k: int,
                       renormalize: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's router: logits [T, E] float32, bias [E] -> (weights [T, top_k] float32,
    expert ids [T, top_k]). Raises ValueError where E does not split into num_groups groups."""
    T, E = logits.shape
    if E % num_groups:
        raise ValueError(f"n_routed_experts={E} does not split into n_group={num_groups} groups")
    scores = logits.sigmoid()
    choice = scores + bias
    group_scores = choice.view(T, num_groups, E // num_groups).topk(2, dim=-1)[0].sum(dim=-1)
    groups = torch.topk(group_scores, k=topk_groups, dim=-1, sorted=False)[1]
    eligible = torch.zeros_like(group_scores).scatter_(1, groups, 1).bool()
    eligible = eligible.unsqueeze(-1).expand(T, num_groups, E // num_groups).reshape(T, E)
    ids = torch.topk(choice.masked_fill(~eligible, float("-inf")), k=top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling, ids


class GroupedTopkRouter(nn.Module):
    def __init__(self, config):
        super().__init__()
        E = config.n_routed_experts
        self.weight = nn.Parameter(torch.empty(E, config.hidden_size), requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(torch.empty(E), requires_grad=False)
        self.config = config

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        logits = F.linear(x.float(), self.weight.float())
        return grouped_topk_route(logits, self.e_score_correction_bias.float(), c.n_group, c.topk_group,
                                  c.num_experts_per_tok, c.norm_topk_prob, c.routed_scaling_factor)


class DeepseekV3MoE(nn.Module):
    """Routed experts plus the shared ones (no gate), one all-reduce."""

    def __init__(self, config, variant: LlamaVariant):
        super().__init__()
        self.gate = GroupedTopkRouter(config)
        self.experts = FusedExperts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size,
                                    config.hidden_act)
        self.shared_experts = LlamaMLP(config, variant, config.moe_intermediate_size * config.n_shared_experts,
                                       reduce=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        return all_reduce(self.experts(x, weights, ids) + self.shared_experts(x))


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """[..., d] with rotary pairs at (0, 1), (2, 3), ... -> the half-split layout (evens, then odds)."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config, backend):
        super().__init__()
        H, hidden = config.num_attention_heads, config.hidden_size
        self.nope, self.rope, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        qk_dim = self.nope + self.rope
        self.head_dim = max(qk_dim, self.v_dim)  # the cache's width: the narrower of K and V zero-padded
        self.scale = qk_dim**-0.5
        bias = config.attention_bias
        self.q_lora = config.q_lora_rank is not None
        if self.q_lora:
            self.q_a_proj = nn.Linear(hidden, config.q_lora_rank, bias=bias)  # replicated: the latent is small
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, _LATENT_NORM_EPS)
            self.q_b_proj = heads_linear(config.q_lora_rank, [H], qk_dim)
        else:
            self.q_proj = heads_linear(hidden, [H], qk_dim)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, config.kv_lora_rank + self.rope, bias=bias)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, _LATENT_NORM_EPS)
        self.kv_b_proj = heads_linear(config.kv_lora_rank, [H], self.nope + self.v_dim)
        self.o_proj = row_linear(H * self.v_dim, hidden, bias, what="num_attention_heads * v_head_dim")
        self.num_heads = self.kv_b_proj.out_features // (self.nope + self.v_dim)  # this rank's
        self.num_kv_heads = self.num_heads
        self.kv_lora_rank = config.kv_lora_rank
        self.interleaved = config.rope_interleave
        self.backend = backend

    def forward(self, x, rotary, kv_cache, meta):
        T, Hl = x.shape[0], self.num_heads
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q_nope, q_rot = q.view(T, Hl, self.nope + self.rope).split([self.nope, self.rope], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        k_rot = k_rot.reshape(T, 1, self.rope)
        if self.interleaved:
            q_rot, k_rot = deinterleave(q_rot), deinterleave(k_rot)
        q_rot, k_rot = rotary(q_rot.contiguous()), rotary(k_rot.contiguous())
        k_nope, v = self.kv_b_proj(self.kv_a_layernorm(latent.contiguous())).view(
            T, Hl, self.nope + self.v_dim).split([self.nope, self.v_dim], dim=-1)
        q = self._pad(torch.cat([q_nope, q_rot], dim=-1))
        k = self._pad(torch.cat([k_nope, k_rot.expand(T, Hl, self.rope)], dim=-1))
        out = self.backend.forward(q, k, self._pad(v), kv_cache, meta, self.scale)[..., :self.v_dim]
        return all_reduce(self.o_proj(out.reshape(T, Hl * self.v_dim)))

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """Zeros up to head_dim: padded q and k dims add nothing to q . k, padded v dims are dropped."""
        width = x.shape[-1]
        return x.contiguous() if width == self.head_dim else F.pad(x, (0, self.head_dim - width))


def attention_mscale(params: dict) -> float:
    """The softmax scale's YaRN factor, mscale(factor, mscale_all_dim) squared, where the RoPE is
    scaled and the config sets mscale_all_dim (transformers' yarn_apply_mscale); else 1."""
    if params["rope_type"] == "default" or not params.get("mscale_all_dim"):
        return 1.0
    return yarn_mscale(params["factor"], params["mscale_all_dim"]) ** 2


class DeepseekV3ForCausalLM(LlamaForCausalLM):
    config_defaults = {**LlamaForCausalLM.config_defaults, "q_lora_rank": None, "rope_interleave": True,
                       "n_shared_experts": 1, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
                       "routed_scaling_factor": 1.0, "first_k_dense_replace": 0}
    config_aliases = {"n_routed_experts": "num_local_experts"}

    def __init__(self, config, backend, max_position: int):
        quantization = getattr(config, "quantization_config", None)
        if quantization:  # the released V3/R1 weights are FP8 blocks with scales beside them
            raise ValueError(f"quantization_config {quantization.get('quant_method', quantization)!r} is not "
                             "supported: use a bfloat16 checkpoint")
        params = rope_parameters(config)
        if params["rope_type"] not in ("default", "yarn"):
            raise ValueError(f"rope_type {params['rope_type']!r} is not supported for DeepseekV3ForCausalLM "
                             "(supported: default, yarn)")
        params.setdefault("max_position_embeddings", config.max_position_embeddings)
        # The Llama decoder's attention projections need these; MLA replaces them below.
        config.num_key_value_heads = config.num_attention_heads
        config.head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        super().__init__(config, backend, max_position)
        for layer in self.model.layers:  # built on the meta device: the replaced modules cost nothing
            layer.self_attn = MultiHeadLatentAttention(config, backend)
            layer.self_attn.scale *= attention_mscale(params)
        self.model.rotary = RotaryEmbedding(config.qk_rope_head_dim, max_position, params)

    def layer_mlp(self, config, variant, layer):
        if layer < config.first_k_dense_replace:
            return None
        return "mlp", DeepseekV3MoE(config, variant)
