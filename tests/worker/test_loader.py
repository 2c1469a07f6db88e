"""Fused projections filled as the weights load: every architecture's q, k and v (and gate, up)
run as one linear whose sections hold this rank's slices of transformers' own tensors, so that
under tensor parallelism a rank's q heads sit beside the one K/V head they read.

(That the fused models compute what transformers computes, at any tensor parallel size, is
tests/stack/test_architectures.py's and tests/stack/test_tensor_parallel.py's.)
"""
import pytest
import torch

from pagedserve.worker import distributed
from pagedserve.worker.attention import TorchAttention
from pagedserve.worker.loader import load_model
from tests.helpers import tiny_models
from tests.helpers.tiny_models import runner_config

UNFUSED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def heads_rows(weight: torch.Tensor, heads, head_dim: int) -> torch.Tensor:
    """The rows of `weight` [heads * head_dim, ...] that project to `heads`, in order."""
    return torch.cat([weight[h * head_dim:(h + 1) * head_dim] for h in heads])


def rank_heads(rank: int, world: int, num_heads: int, num_kv_heads: int) -> tuple[list[int], list[int]]:
    """(query heads, KV heads) a rank holds: an even share of the query heads, and the KV heads
    those queries read (query head q reads KV head q // (num_heads / num_kv_heads))."""
    per_rank, group = num_heads // world, num_heads // num_kv_heads
    queries = list(range(rank * per_rank, (rank + 1) * per_rank))
    return queries, sorted({q // group for q in queries})


def expected_sections(architecture: str, hf: dict, layer: int, rank: int, world: int, config) -> dict:
    """This rank's fused parameters of one layer, built from transformers' tensors by hand:
    {our parameter name: expected tensor}."""
    if architecture == "gpt2":  # fused in the checkpoint already, stored [in, out] (Conv1D)
        prefix, hidden, heads = f"transformer.h.{layer}.attn.c_attn", config.n_embd, config.n_head
        queries, _ = rank_heads(rank, world, heads, heads)
        weight, bias = hf[f"{prefix}.weight"].t(), hf[f"{prefix}.bias"]
        sections = [slice(s * hidden, (s + 1) * hidden) for s in range(3)]
        return {f"{prefix}.weight": torch.cat([heads_rows(weight[s], queries, hidden // heads) for s in sections]),
                f"{prefix}.bias": torch.cat([heads_rows(bias[s], queries, hidden // heads) for s in sections])}
    base = f"model.decoder.layers.{layer}" if architecture == "opt" else f"model.layers.{layer}"
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    queries, keys = rank_heads(rank, world, heads, kv_heads)
    expected = {}
    for kind in ("weight", "bias"):
        q, k, v = (hf.get(f"{base}.self_attn.{name}.{kind}") for name in ("q_proj", "k_proj", "v_proj"))
        if q is not None:
            expected[f"{base}.self_attn.qkv_proj.{kind}"] = torch.cat(
                [heads_rows(q, queries, head_dim), heads_rows(k, keys, head_dim), heads_rows(v, keys, head_dim)])
    if architecture != "opt":
        part = config.intermediate_size // world
        rows = slice(rank * part, (rank + 1) * part)
        gate, up = hf[f"{base}.mlp.gate_proj.weight"], hf[f"{base}.mlp.up_proj.weight"]
        expected[f"{base}.mlp.gate_up_proj.weight"] = torch.cat([gate[rows], up[rows]])
    return expected


@pytest.mark.parametrize("architecture, overrides, world", [
    ("llama", {"num_key_value_heads": 2}, 4),  # 8 query heads: two ranks share each KV head
    ("llama", {"num_key_value_heads": 4}, 2),
    ("mistral", {}, 2),
    ("qwen2", {}, 2),  # q, k and v biases
    ("qwen3", {}, 2),  # head_dim 32: heads x head_dim != hidden_size
    ("opt", {}, 2),
    ("gpt2", {}, 2),
])
def test_each_ranks_fused_projections_hold_its_slices_of_the_checkpoint(tmp_path, monkeypatch, architecture,
                                                                        overrides, world):
    hf_model = tiny_models.build(architecture, tmp_path, **overrides)
    hf = hf_model.state_dict()
    monkeypatch.setattr(distributed, "_world_size", world)  # loading needs no communication
    for rank in range(world):
        monkeypatch.setattr(distributed, "_rank", rank)
        model = load_model(runner_config(tmp_path, rank=rank, world_size=world), TorchAttention()).model
        ours = dict(model.named_parameters())
        assert not [name for name, _ in model.named_modules() if name.rpartition(".")[2] in UNFUSED]  # one layout
        for layer in range(hf_model.config.num_hidden_layers):
            expected = expected_sections(architecture, hf, layer, rank, world, hf_model.config)
            assert expected
            for name, tensor in expected.items():
                assert torch.equal(ours[name], tensor), f"rank {rank}: {name}"
