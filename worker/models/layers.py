"""Building blocks shared by the decoder-only models: linear layers, RMSNorm, rotary embeddings.

Every linear layer of a model is built here, through the name of the way tensor parallelism will
split it (Megatron-style, see DESIGN.md). Today both are plain nn.Linear; sharding them later is
a change to this file and to the loader's copy, not to the model files.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


def column_linear(in_features: int, out_features: int, bias: bool = False) -> nn.Linear:
    """A projection whose output features will be split across ranks (QKV, gate/up)."""
    return nn.Linear(in_features, out_features, bias=bias)


def row_linear(in_features: int, out_features: int, bias: bool = False) -> nn.Linear:
    """A projection whose input features will be split across ranks, then all-reduced (o, down)."""
    return nn.Linear(in_features, out_features, bias=bias)


def vocab_embedding(vocab_size: int, hidden_size: int) -> nn.Embedding:
    """The token embedding; the vocabulary is what will be split across ranks."""
    return nn.Embedding(vocab_size, hidden_size)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32 whatever the model dtype, as the checkpoints were trained.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


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


class RotaryEmbedding(nn.Module):
    """cos/sin for every position up to max_position, computed once; a step indexes them by its
    tokens' positions (one gather per step, shared by all layers)."""

    def __init__(self, head_dim: int, max_position: int, params: dict):
        super().__init__()
        rope_type = params["rope_type"]
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"rope_type {rope_type!r} is not supported (supported: default, llama3)")
        self.head_dim = head_dim
        self.max_position = max_position
        self.params = params
        self.cos_sin: torch.Tensor | None = None  # built by build(), after weights are on device

    def build(self, device: torch.device) -> None:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        inv_freq = 1.0 / (self.params["rope_theta"] ** exponents)
        if self.params["rope_type"] == "llama3":
            inv_freq = _llama3_scaled(inv_freq, self.params)
        freqs = torch.outer(torch.arange(self.max_position, device=device).float(), inv_freq)
        self.cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # [max_position, head_dim]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.cos_sin[positions].to(dtype).chunk(2, dim=-1)
        return cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, head_dim / 2]: broadcast over heads


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [T, heads, head_dim] in the half-split layout Hugging Face Llama checkpoints use."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
