"""The compiled norm and rotation (worker/cpu/ops.c) against the torch code they replace, on the
layouts the Llama layers hand them: contiguous hidden states, the q and k views of a fused qkv
output (rows further apart than their heads), Qwen3's per-head norm, odd widths that leave a tail
after the 8-wide loop, single tokens and batches big enough to go parallel."""
import pytest
import torch

from pagedserve.worker.cpu.ops import _cpu_ops
from pagedserve.worker.models.layers import RMSNorm, RotaryEmbedding, apply_rotary


@pytest.fixture(scope="module")
def ops():
    ops = _cpu_ops()
    assert ops is not None, "the C compiler should build the ops on this machine"
    return ops


def norm(dim: int, g: torch.Generator) -> RMSNorm:
    layer = RMSNorm(dim, 1e-5)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(dim, generator=g) + 0.5)
    return layer


@pytest.mark.parametrize("tokens,dim", [(1, 576), (7, 100), (300, 576)])
def test_rms_norm_matches_torch(ops, tokens, dim):
    g = torch.Generator().manual_seed(tokens + dim)
    layer, x = norm(dim, g), torch.randn(tokens, dim, generator=g) * 3
    torch.testing.assert_close(ops.rms_norm(x, layer.weight, layer.eps), layer.normalize(x), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("tokens", [1, 300])
def test_residual_add_and_norm_in_one_pass(ops, tokens):
    """(norm(residual + x), residual + x), the sum written over the residual: the sum exactly
    torch's, the norm within rounding of the order of its sum of squares."""
    g = torch.Generator().manual_seed(tokens)
    layer = norm(576, g)
    x, residual = torch.randn(tokens, 576, generator=g), torch.randn(tokens, 576, generator=g)
    expected_sum = residual + x
    out = ops.rms_norm(x, layer.weight, layer.eps, residual)
    assert torch.equal(residual, expected_sum)
    torch.testing.assert_close(out, layer.normalize(expected_sum), atol=2e-6, rtol=2e-6)


def test_layer_dispatch_gives_the_torch_results(ops):
    """RMSNorm.forward (the compiled op for float32 CPU tensors) against its own torch path,
    with and without the residual, on a strided view: Qwen3's per-head q norm on fused qkv rows."""
    g = torch.Generator().manual_seed(3)
    layer = norm(64, g)
    qkv = torch.randn(5, (4 + 2 + 2) * 64, generator=g)
    q = qkv[:, : 4 * 64].view(5, 4, 64)  # rows 512 floats apart, heads 64
    torch.testing.assert_close(layer(q), layer.normalize(q), atol=2e-6, rtol=2e-6)
    hidden = norm(576, g)
    x, residual = torch.randn(9, 576, generator=g), torch.randn(9, 576, generator=g)
    out, new_residual = hidden(x, residual.clone())
    expected_out, expected_residual = hidden.normalize(residual + x), residual + x
    assert torch.equal(new_residual, expected_residual)
    torch.testing.assert_close(out, expected_out, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("tokens", [1, 3, 200])
@pytest.mark.parametrize("head_dim", [64, 128, 10])
def test_rotary_in_place_equals_torch_bit_for_bit(ops, tokens, head_dim):
    """q and k as views of a fused qkv output, at scattered positions: with no fused
    multiply-adds the rotation rounds exactly as torch's separate ops do."""
    g = torch.Generator().manual_seed(tokens * head_dim)
    rotary = RotaryEmbedding(head_dim, 4096, {"rope_theta": 10000.0, "rope_type": "default"})
    rotary.build(torch.device("cpu"))
    positions = torch.randint(0, 4096, (tokens,), generator=g)
    heads, kv_heads = 9, 3
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim: (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    cos, sin = rotary.cos_sin[positions].chunk(2, dim=-1)
    expected = [apply_rotary(t, cos.unsqueeze(1), sin.unsqueeze(1)) for t in (q, k)]
    untouched = qkv[:, (heads + kv_heads) * head_dim:].clone()
    step = rotary(positions)
    assert step(q) is q and step(k) is k  # rotated in place
    assert torch.equal(q, expected[0]) and torch.equal(k, expected[1])
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], untouched)  # v is left alone


def test_rotary_falls_back_to_torch_where_heads_are_not_side_by_side(ops):
    x = torch.randn(4, 64, 3).transpose(1, 2)  # [4, 3, 64], head_dim not contiguous
    assert not ops.rotary(x, torch.zeros(4, dtype=torch.int64), torch.zeros(1, 64))
    assert not ops.rotary(torch.randn(4, 3, 64), torch.zeros(4, dtype=torch.int32), torch.zeros(1, 64))


def test_kv_write_puts_fused_views_where_index_copy_would(ops):
    g = torch.Generator().manual_seed(5)
    tokens, kv_heads, head_dim = 37, 3, 64
    qkv = torch.randn(tokens, (9 + 2 * kv_heads) * head_dim, generator=g)
    k = qkv[:, 9 * head_dim: 12 * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, 12 * head_dim:].view(tokens, kv_heads, head_dim)
    slots = torch.randperm(20 * 16, generator=g)[:tokens]
    caches = [torch.randn(20, 16, kv_heads, head_dim, generator=g) for _ in range(2)]
    expected = [c.clone() for c in caches]
    expected[0].view(-1, kv_heads, head_dim).index_copy_(0, slots, k)
    expected[1].view(-1, kv_heads, head_dim).index_copy_(0, slots, v)
    assert ops.write_kv(k, v, *caches, slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])
    assert not ops.write_kv(k, v, *caches, slots.to(torch.int32))  # a layout it does not take: untouched


def test_kv_write_of_a_bfloat16_cache_is_index_copy_s(ops):
    g = torch.Generator().manual_seed(6)
    tokens, kv_heads, head_dim = 37, 3, 64
    qkv = torch.randn(tokens, (9 + 2 * kv_heads) * head_dim, generator=g).to(torch.bfloat16)
    k = qkv[:, 9 * head_dim: 12 * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, 12 * head_dim:].view(tokens, kv_heads, head_dim)
    slots = torch.randperm(20 * 16, generator=g)[:tokens]
    caches = [torch.randn(20, 16, kv_heads, head_dim, generator=g).to(torch.bfloat16) for _ in range(2)]
    expected = [c.clone() for c in caches]
    expected[0].view(-1, kv_heads, head_dim).index_copy_(0, slots, k)
    expected[1].view(-1, kv_heads, head_dim).index_copy_(0, slots, v)
    assert ops.write_kv(k, v, *caches, slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])
    # Mixed or other dtypes: nothing written, the caller's index_copy_ does it.
    assert not ops.write_kv(k.float(), v.float(), *caches, slots)
    half = [c.half() for c in caches]
    assert not ops.write_kv(k.half(), v.half(), *half, slots)
    assert torch.equal(caches[0], expected[0])


@pytest.mark.parametrize("tokens,inter", [(1, 1536), (300, 1536), (5, 37)])
def test_silu_and_mul_within_an_ulp_or_two_of_torch(ops, tokens, inter):
    """One pass over the fused gate/up output; libmvec's vector expf (1 ulp) instead of torch's,
    so the two agree to a few ulp, not bit for bit."""
    g = torch.Generator().manual_seed(tokens + inter)
    gate_up = torch.randn(tokens, 2 * inter, generator=g) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(ops.silu_and_mul(gate_up), torch.nn.functional.silu(gate) * up, rtol=1e-6, atol=1e-7)
