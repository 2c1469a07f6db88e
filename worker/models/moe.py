"""The sparse mixture-of-experts MLP (Shazeer et al. 2017; Mixtral, Qwen2-MoE, Qwen3-MoE): a
router picks each token's top-k experts, each expert is a gated MLP, and a token's output is the
router-weighted sum of its experts' outputs (plus, in Qwen2-MoE, a shared expert every token
passes through, scaled by a sigmoid gate).

The experts' weights are stacked, [experts, 2 * intermediate, hidden] for gate/up (side by side in
each expert's rows, as the dense MLP's `gate_up_proj`) and [experts, hidden, intermediate] for
down, filled from the checkpoint's per-expert tensors (sharding.Experts). The experts run grouped:
the (token, expert) pairs are sorted by expert and each expert that received tokens runs one
matmul over all of them, so a step reads each active expert's weights once however many tokens
chose it (on the CPU a loop over experts in torch; on CUDA the Triton kernel,
kernels/fused_moe.py). Under tensor parallelism every rank holds a slice of every expert's
intermediate dimension (as the dense MLP is sliced): the router runs whole on every rank, and the
partial sums of the experts and the shared expert meet in one all-reduce after the layer.
"""
import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.worker.distributed import all_reduce
from pagedserve.worker.models.layers import ActAndMul
from pagedserve.worker.models.sharding import Experts, Shard, even_split


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's choice for each token, as transformers computes it (Qwen2MoeTopKRouter,
    MixtralTopKRouter): softmax over all experts in float32, the top_k largest, and, where
    `renormalize` (Mixtral always; Qwen `norm_topk_prob`), divided by their sum.

    logits [T, experts] -> (weights [T, top_k] float32, expert ids [T, top_k] int64), largest
    first."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def sort_by_expert(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, counts): `order` [T * top_k] lists the flattened (token, slot) pairs grouped by
    expert, in token order within each (a stable sort), and `counts` [experts] how many each got."""
    flat = ids.reshape(-1)
    return torch.sort(flat, stable=True).indices, torch.bincount(flat, minlength=num_experts)


def grouped_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
                    ids: torch.Tensor, act_and_mul) -> torch.Tensor:
    """The experts' weighted sum for every token, one matmul pair per expert that received tokens
    (an expert without tokens costs nothing): x [T, H], gate_up [E, 2I, H], down [E, H, I],
    weights and ids [T, k] (route) -> [T, H] in x's dtype (the weights multiply in float32, then
    the sum in x's dtype, as transformers' experts loop does)."""
    T, k = ids.shape
    order, counts = sort_by_expert(ids, gate_up.shape[0])
    tokens = order // k
    rows = x[tokens]  # [T * k, H], grouped by expert
    out = torch.empty_like(rows)
    start = 0
    for expert, n in enumerate(counts.tolist()):  # one host sync for all the counts
        if n:
            group = slice(start, start + n)
            out[group] = F.linear(act_and_mul(F.linear(rows[group], gate_up[expert])), down[expert])
            start += n
    scaled = (out * weights.reshape(-1)[order].unsqueeze(-1)).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, tokens, scaled)


class FusedExperts(nn.Module):
    """The stacked experts: gate_up_proj [E, 2 * I_rank, H] and down_proj [E, H, I_rank], this
    rank's slice of every expert. `names` are the checkpoint's per-expert modules (gate, up, down):
    Qwen's gate_proj/up_proj/down_proj, Mixtral's w1/w3/w2."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str,
                 names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")):
        super().__init__()
        start, n = even_split(intermediate_size, "moe_intermediate_size")
        column = Shard(0, ((start, n),), intermediate_size)
        gate, up, down = names
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * n, hidden_size), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, n), requires_grad=False)
        self.tp_shards = {"gate_up_proj": Experts(num_experts, ((gate, column), (up, column))),
                          "down_proj": Experts(num_experts, ((down, Shard(1, ((start, n),), intermediate_size)),))}
        self.act_and_mul = ActAndMul(hidden_act)
        self.hidden_act = hidden_act
        self.use_kernel: bool | None = None  # the Triton kernel: None, on CUDA (tests set True on the CPU)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], weights and ids [T, k] -> this rank's partial sum [T, H]."""
        use_kernel = x.is_cuda if self.use_kernel is None else self.use_kernel
        if use_kernel and self.hidden_act == "silu":
            from pagedserve.kernels.fused_moe import fused_moe
            return fused_moe(x, self.gate_up_proj, self.down_proj, weights, ids)
        return grouped_experts(x, self.gate_up_proj, self.down_proj, weights, ids, self.act_and_mul)


class SparseMoeBlock(nn.Module):
    """Router + experts (+ Qwen2-MoE's gated shared expert), one all-reduce at the end.

    `weights_in_model_dtype`: Qwen's routers cast the top-k weights to the model's dtype before
    they scale the experts' outputs; Mixtral's scale in float32. `shared_expert`: a gated MLP
    that returns its partial sum without reducing it (LlamaMLP(..., reduce=False))."""

    def __init__(self, config, num_experts: int, top_k: int, intermediate_size: int, renormalize: bool,
                 weights_in_model_dtype: bool, names=("gate_proj", "up_proj", "down_proj"),
                 shared_expert: nn.Module | None = None):
        super().__init__()
        if top_k > num_experts:
            raise ValueError(f"num_experts_per_tok={top_k} exceeds the number of experts {num_experts}")
        self.gate = nn.Linear(config.hidden_size, num_experts, bias=False)  # replicated: every rank routes
        self.experts = FusedExperts(num_experts, config.hidden_size, intermediate_size, config.hidden_act, names)
        if shared_expert is not None:
            self.shared_expert = shared_expert
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        self.has_shared_expert = shared_expert is not None
        self.top_k, self.renormalize = top_k, renormalize
        self.weights_in_model_dtype = weights_in_model_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        weights, ids = route(logits, self.top_k, self.renormalize)
        if self.weights_in_model_dtype:
            weights = weights.to(logits.dtype)
        out = self.experts(x, weights, ids)
        if self.has_shared_expert:
            # sigmoid(gate) is the same on every rank, so scaling each rank's partial sum is exact.
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return all_reduce(out)
