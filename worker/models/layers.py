"""Building blocks shared by the decoder-only models: linear layers split for tensor parallelism,
the vocabulary-split embedding and LM head, norms, activations, rotary embeddings.

Every projection of a model is built here, through the name of the way tensor parallelism splits
it (Megatron-style, see sharding.py); projections that read the same input are one linear from
the start (`fused_linear`: q/k/v, gate/up), filled section by section as the weights load. They
are plain nn.Linear of this rank's size, so the CPU path can still prepack them; the all-reduce
after a row-split projection is the model's own line (`all_reduce(self.o_proj(x))`), as in the
paper's diagram.
"""
import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.worker.cpu.ops import cpu_ops
from pagedserve.worker.distributed import all_gather, all_reduce, rank
from pagedserve.worker.models.sharding import Fused, Shard, even_split, head_split, padded_split


def _linear(in_features: int, out_features: int, bias: bool, shards: dict[str, Shard | Fused]) -> nn.Linear:
    linear = nn.Linear(in_features, out_features, bias=bias)
    linear.tp_shards = shards
    return linear


def column_shard(out_features: int, what: str = "intermediate_size") -> Shard:
    """This rank's even part of a projection's output features (gate, up, fc1)."""
    start, n = even_split(out_features, what)
    return Shard(0, ((start, n),), out_features)


def heads_shard(heads: list[int], head_dim: int, replicate: bool = False, what: str = "num_attention_heads") -> Shard:
    """This rank's part of a projection to attention heads, split by heads: q (`heads=[H]`), k or v
    (`[KV]`, `replicate=True`: ranks may outnumber KV heads), or a checkpoint's fused one whose
    sections are split each (GPT-2's c_attn, `[H, H, H]`): its heads of every section, in order."""
    pieces, offset = [], 0
    for count in heads:
        first, local = head_split(count, what, replicate)
        pieces.append((offset + first * head_dim, local * head_dim))
        offset += count * head_dim
    return Shard(0, tuple(pieces), offset)


def _output_split(in_features: int, shard: Shard, bias: bool, transposed: bool) -> nn.Linear:
    weight = replace(shard, transposed=transposed)  # a bias is 1-D: never transposed
    return _linear(in_features, shard.length, bias, {"weight": weight, "bias": shard})


def column_linear(in_features: int, out_features: int, bias: bool = False, transposed: bool = False,
                  what: str = "intermediate_size") -> nn.Linear:
    """Output features split evenly across ranks (fc1, c_fc): no communication after it."""
    return _output_split(in_features, column_shard(out_features, what), bias, transposed)


def heads_linear(in_features: int, heads: list[int], head_dim: int, bias: bool = False, transposed: bool = False,
                 replicate: bool = False, what: str = "num_attention_heads") -> nn.Linear:
    """A projection to attention heads, split by heads (see heads_shard)."""
    return _output_split(in_features, heads_shard(heads, head_dim, replicate, what), bias, transposed)


def fused_linear(in_features: int, bias: bool = False, **sections: Shard) -> nn.Linear:
    """Projections that read the same input as one linear, their outputs side by side in the order
    given (q, k, v; gate, up): one matmul with a wider weight instead of several. The checkpoint
    stores them apart, as the sibling modules the keywords name, each split by its own Shard; the
    loader reads each into its section (sharding.Fused)."""
    fused = Fused(tuple(sections.items()))
    return _linear(in_features, fused.length, bias, {"weight": fused, "bias": fused})


def row_linear(in_features: int, out_features: int, bias: bool = False, transposed: bool = False,
               what: str = "intermediate_size") -> nn.Linear:
    """Input features split across ranks (o_proj, down_proj): each rank's output is a partial sum
    that the caller all-reduces. The bias must be added once, after the sum: only rank 0 holds it
    (the others hold zeros), so an ordinary nn.Linear does the right thing on every rank."""
    start, n = even_split(in_features, what)
    bias_pieces = ((0, out_features),) if rank() == 0 else ()
    return _linear(n, out_features, bias, {"weight": Shard(1, ((start, n),), in_features, transposed),
                                          "bias": Shard(0, bias_pieces, out_features)})


class VocabEmbedding(nn.Embedding):
    """The token embedding, split over the vocabulary: a rank looks up the ids in its range, zeros
    elsewhere, and the sum over ranks is every token's row."""

    def __init__(self, vocab_size: int, hidden_size: int):
        start, n, per_rank = padded_split(vocab_size)
        super().__init__(per_rank, hidden_size, _weight=torch.empty(per_rank, hidden_size))  # see position_embedding
        self.vocab_start, self.vocab_end = start, start + n
        self.whole = n == vocab_size  # one rank: a plain lookup
        self.tp_shards = {"weight": Shard(0, ((start, n),), vocab_size)}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.whole:
            return super().forward(ids)
        mine = (ids >= self.vocab_start) & (ids < self.vocab_end)
        rows = super().forward(torch.where(mine, ids - self.vocab_start, 0))
        return all_reduce(rows * mine.unsqueeze(-1).to(rows.dtype))


def vocab_embedding(vocab_size: int, hidden_size: int) -> VocabEmbedding:
    return VocabEmbedding(vocab_size, hidden_size)


def position_embedding(num_positions: int, hidden_size: int) -> nn.Embedding:
    """A learned position table (replicated: it is small). Built without nn.Embedding's random
    init, which the loader overwrites anyway: on the meta device normal_ imports sympy, seconds of
    every worker's start."""
    return nn.Embedding(num_positions, hidden_size, _weight=torch.empty(num_positions, hidden_size))


def lm_head(hidden_size: int, vocab_size: int) -> nn.Linear:
    """The LM head, split over the vocabulary like the embedding (so the two can be tied)."""
    start, n, per_rank = padded_split(vocab_size)
    return _linear(hidden_size, per_rank, False, {"weight": Shard(0, ((start, n),), vocab_size)})


def gather_logits(local: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[N, vocab] from every rank's [N, vocab slice] (padding dropped), on every rank: each rank
    samples the same tokens from the same logits with the same seed, so their batches agree."""
    return all_gather(local)[:, :vocab_size]


def activation(name: str):
    """Hugging Face's `hidden_act` / `activation_function` names."""
    functions = {
        "silu": F.silu,
        "relu": F.relu,
        "gelu": F.gelu,
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    }
    if name not in functions:
        raise ValueError(f"activation {name!r} is not supported (supported: {', '.join(functions)})")
    return functions[name]


class ActAndMul(nn.Module):
    """act(gate) * up for gate_up [T, 2 * inter] (gate's half first), the gated MLP's middle
    (vLLM's SiluAndMul): one pass of the compiled op for SiLU in float32 or bfloat16 on the CPU."""

    def __init__(self, name: str):
        super().__init__()
        self.act = activation(name)

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        ops = cpu_ops(gate_up) if self.act is F.silu else None
        if ops is not None:
            return ops.silu_and_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act(gate) * up


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); or, given the residual stream, (norm(residual + x), residual + x): the add and
        the norm in one pass on the CPU, where the sum is written over `residual`."""
        ops = cpu_ops(x) if self.weight.dtype == x.dtype else None  # else torch's promotion rules
        if ops is not None and (residual is None or (residual.is_contiguous() and residual.dtype == x.dtype)):
            out = ops.rms_norm(x, self.weight, self.eps, residual)
            return out if residual is None else (out, residual)
        if residual is None:
            return self.normalize(x)
        residual = residual + x
        return self.normalize(residual), residual

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32 whatever the model dtype, as the checkpoints were trained.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_parameters(config) -> dict:
    """The RoPE settings of a config.json in either spelling: transformers 5 writes
    `rope_parameters` (theta inside), older checkpoints `rope_theta` + `rope_scaling`."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.pop("type", "default"))
    return params


def _llama3_scaled(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    # Llama 3.1's long-context recipe: low frequencies slowed down by `factor`, high ones kept,
    # a smooth ramp between the two wavelength bounds.
    factor = params["factor"]
    low_freq_factor = params.get("low_freq_factor", 1.0)
    high_freq_factor = params.get("high_freq_factor", 4.0)
    old_context = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _longrope_scaled(inv_freq: torch.Tensor, params: dict, max_position: int) -> tuple[torch.Tensor, float]:
    """LongRoPE (Ding et al. 2024; Phi-3's `longrope`, formerly `su`): each frequency divided by
    its own factor, `long_factor` where the served context exceeds `original_max_position_embeddings`,
    else `short_factor`; and cos/sin scaled by sqrt(1 + ln(factor) / ln(original)), factor being
    max_position_embeddings / original unless given (transformers' _compute_longrope_parameters).
    One set for every position, chosen by the context served, as vLLM does: transformers picks per
    forward call by the longest sequence in it, which agrees wherever a sequence stays on one side
    of the original length or is prefilled past it at once. Returns (inv_freq, attention_factor)."""
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or params["max_position_embeddings"] / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = params["long_factor"] if max_position > original else params["short_factor"]
    return inv_freq / torch.tensor(ext, dtype=torch.float32, device=inv_freq.device), attention_factor


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature for a context `factor` times longer (Peng et al. 2023)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_scaled(exponents: torch.Tensor, params: dict, head_dim: int) -> tuple[torch.Tensor, float]:
    """YaRN (`yarn`: Qwen2.5 long context, DeepSeek V3): frequencies that turn fewer than
    `beta_slow` times over the original context are divided by `factor`, those that turn more
    than `beta_fast` times kept, a linear ramp between; cos/sin scaled by yarn_mscale (or its
    mscale / mscale_all_dim ratio). As transformers' _compute_yarn_parameters. Returns
    (inv_freq, attention_factor)."""
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or params["max_position_embeddings"] / original
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else yarn_mscale(factor))
    base = params["rope_theta"]

    def dim_of(rotations: float) -> float:  # the dim whose frequency turns `rotations` times over the context
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(params.get("beta_fast") or 32), dim_of(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    high = high + 0.001 if low == high else high
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32, device=exponents.device) - low)
                       / (high - low), 0, 1)
    pos_freqs = base**exponents
    keep = 1 - ramp
    return 1.0 / (factor * pos_freqs) * (1 - keep) + 1.0 / pos_freqs * keep, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin for every position up to max_position, computed once; a step indexes them by its
    tokens' positions (one gather per step, shared by all layers)."""

    def __init__(self, head_dim: int, max_position: int, params: dict):
        super().__init__()
        rope_type = params["rope_type"]
        if rope_type not in ("default", "llama3", "longrope", "yarn", "linear"):
            raise ValueError(f"rope_type {rope_type!r} is not supported (supported: default, llama3, longrope, yarn, linear)")
        self.head_dim = head_dim
        self.max_position = max_position
        self.params = params
        self.cos_sin: torch.Tensor | None = None  # built by build(), after weights are on device

    def build(self, device: torch.device) -> None:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        inv_freq = 1.0 / (self.params["rope_theta"] ** exponents)
        scale = 1.0
        if self.params["rope_type"] == "llama3":
            inv_freq = _llama3_scaled(inv_freq, self.params)
        elif self.params["rope_type"] == "longrope":
            inv_freq, scale = _longrope_scaled(inv_freq, self.params, self.max_position)
        elif self.params["rope_type"] == "yarn":
            inv_freq, scale = _yarn_scaled(exponents, self.params, self.head_dim)
        elif self.params["rope_type"] == "linear":  # positions divided by `factor` (Gemma 3's global layers)
            inv_freq = inv_freq / self.params["factor"]
        freqs = torch.outer(torch.arange(self.max_position, device=device).float(), inv_freq)
        self.cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # [max_position, head_dim]
        if scale != 1.0:
            self.cos_sin *= scale

    def forward(self, positions: torch.Tensor) -> "StepRotary":
        return StepRotary(positions, self.cos_sin)


class StepRotary:
    """The rotation of one step's tokens, shared by every layer: by the compiled op in place on
    the CPU, else with cos/sin gathered once per step by the tokens' positions."""

    def __init__(self, positions: torch.Tensor, cos_sin: torch.Tensor):
        self.positions, self.cos_sin = positions, cos_sin
        self.cos = self.sin = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, heads, head_dim] rotated (in place where the compiled op serves it)."""
        ops = cpu_ops(x)
        if ops is not None and ops.rotary(x, self.positions, self.cos_sin):
            return x
        if self.cos is None:
            cos, sin = self.cos_sin[self.positions].to(x.dtype).chunk(2, dim=-1)
            self.cos, self.sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, head_dim / 2]: broadcast over heads
        return apply_rotary(x, self.cos, self.sin)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [T, heads, head_dim] in the half-split layout Hugging Face Llama checkpoints use."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
