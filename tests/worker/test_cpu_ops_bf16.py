"""The compiled element-wise ops in bfloat16 (worker/cpu/ops.c's _bf16 twins) against the torch code
they replace, run in bfloat16 on the same inputs: the rotation bit for bit (every product and sum
rounds where torch's separate ops round), the norm and SiLU within one bfloat16 ulp (the norm's sum
of squares runs in another order, libmvec's expf is not torch's), on the layouts the Llama layers
hand them: contiguous rows, views of a fused output, odd widths, single tokens and batches big
enough to go parallel."""
import ctypes

import pytest
import torch
import torch.nn.functional as F

from pagedserve.worker.cpu.ops import _cpu_ops, cpu_ops
from pagedserve.worker.models.layers import ActAndMul, RMSNorm, RotaryEmbedding, apply_rotary

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def ops():
    ops = _cpu_ops()
    assert ops is not None, "the C compiler should build the ops on this machine"
    return ops


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bfloat16 values lie between a and b, elementwise (sign-magnitude bits made ordered)."""
    def ordered(t):
        bits = t.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
        return torch.where(bits >= 0x8000, 0x8000 - bits, bits)
    assert a.dtype == b.dtype == BF16 and a.shape == b.shape
    return (ordered(a) - ordered(b)).abs()


def norm(dim: int, g: torch.Generator) -> RMSNorm:
    layer = RMSNorm(dim, 1e-5)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(dim, generator=g) + 0.5)
    return layer.to(BF16)


def test_ulps_counts_across_zero_and_between_neighbours():
    one = torch.tensor([1.0], dtype=BF16)
    next_up = (one.view(torch.int16) + 1).view(BF16)
    assert ulps(one, next_up).item() == 1 and ulps(one, one).item() == 0
    assert ulps(torch.tensor([0.0], dtype=BF16), torch.tensor([-0.0], dtype=BF16)).item() == 0
    tiny = torch.tensor([0], dtype=torch.int16).add(1).view(BF16)  # the smallest subnormal
    assert ulps(tiny, -tiny).item() == 2


@pytest.mark.parametrize("tokens,dim", [(1, 576), (7, 100), (300, 576)])
def test_rms_norm_within_an_ulp_of_torch(ops, tokens, dim):
    g = torch.Generator().manual_seed(tokens + dim)
    layer, x = norm(dim, g), (torch.randn(tokens, dim, generator=g) * 3).to(BF16)
    out, expected = ops.rms_norm(x, layer.weight, layer.eps), layer.normalize(x)
    assert out.dtype == BF16 and ulps(out, expected).max() <= 1
    heads = x[:, : dim // 4 * 4].reshape(tokens, 4, dim // 4)  # contiguous [T, heads, d]: a per-head norm
    small = norm(dim // 4, g)
    assert ulps(ops.rms_norm(heads, small.weight, small.eps), small.normalize(heads)).max() <= 1


@pytest.mark.parametrize("tokens", [1, 300])
def test_residual_add_and_norm_in_bf16(ops, tokens):
    """The residual stream stays bfloat16: the sum is torch's bfloat16 add bit for bit, the norm of
    it within an ulp."""
    g = torch.Generator().manual_seed(tokens)
    layer = norm(576, g)
    x, residual = (torch.randn(tokens, 576, generator=g).to(BF16) for _ in range(2))
    expected_sum = residual + x
    out = ops.rms_norm(x, layer.weight, layer.eps, residual)
    assert torch.equal(residual, expected_sum)
    assert ulps(out, layer.normalize(expected_sum)).max() <= 1


def test_layers_dispatch_bf16_to_the_compiled_ops(ops):
    """RMSNorm.forward (with a residual, and per head on a strided view as Qwen3's q norm),
    ActAndMul and StepRotary on bfloat16 CPU tensors give the torch paths' results; a float32
    weight with bfloat16 x keeps torch's promotion (a float32 output)."""
    g = torch.Generator().manual_seed(3)
    layer = norm(64, g)
    qkv = torch.randn(5, (4 + 2 + 2) * 64, generator=g).to(BF16)
    q = qkv[:, : 4 * 64].view(5, 4, 64)
    assert ulps(layer(q), layer.normalize(q)).max() <= 1
    hidden = norm(576, g)
    x, residual = (torch.randn(9, 576, generator=g).to(BF16) for _ in range(2))
    out, new_residual = hidden(x, residual.clone())
    assert torch.equal(new_residual, residual + x)
    assert ulps(out, hidden.normalize(residual + x)).max() <= 1
    mixed = RMSNorm(576, 1e-5)
    assert mixed(x).dtype == torch.float32 and torch.equal(mixed(x), mixed.normalize(x))
    gate_up = (torch.randn(3, 2 * 96, generator=g) * 4).to(BF16)
    gate, up = gate_up.chunk(2, dim=-1)
    assert cpu_ops(gate_up) is ops
    assert ulps(ActAndMul("silu")(gate_up), F.silu(gate) * up).max() <= 1


@pytest.mark.parametrize("tokens", [1, 3, 200])
@pytest.mark.parametrize("head_dim", [64, 128, 10])
def test_rotary_bf16_equals_torch_bit_for_bit(ops, tokens, head_dim):
    """q and k as views of a fused bfloat16 qkv output at scattered positions, against
    apply_rotary with cos/sin cast to bfloat16 (the fallback, and transformers' Llama)."""
    g = torch.Generator().manual_seed(tokens * head_dim)
    rotary = RotaryEmbedding(head_dim, 4096, {"rope_theta": 10000.0, "rope_type": "default"})
    rotary.build(torch.device("cpu"))
    positions = torch.randint(0, 4096, (tokens,), generator=g)
    heads, kv_heads = 9, 3
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g) * 2).to(BF16)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim: (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    cos, sin = rotary.cos_sin[positions].to(BF16).chunk(2, dim=-1)
    expected = [apply_rotary(t, cos.unsqueeze(1), sin.unsqueeze(1)) for t in (q, k)]
    untouched = qkv[:, (heads + kv_heads) * head_dim:].clone()
    step = rotary(positions)
    assert step(q) is q and step(k) is k  # rotated in place
    assert torch.equal(q, expected[0]) and torch.equal(k, expected[1])
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], untouched)


def test_rotary_refuses_a_table_that_is_not_float32(ops):
    x = torch.randn(2, 3, 64).to(BF16)
    before = x.clone()
    assert not ops.rotary(x, torch.zeros(2, dtype=torch.int64), torch.zeros(1, 64, dtype=BF16))
    assert torch.equal(x, before)


@pytest.mark.parametrize("tokens,inter", [(1, 1536), (300, 1536), (5, 37)])
def test_silu_and_mul_bf16_within_an_ulp_of_torch(ops, tokens, inter):
    """silu(gate) stored in bfloat16, then times up, as torch's two bfloat16 ops: within one ulp
    (libmvec's expf against torch's), and nearly all bit for bit."""
    g = torch.Generator().manual_seed(tokens + inter)
    gate_up = (torch.randn(tokens, 2 * inter, generator=g) * 4).to(BF16)
    gate, up = gate_up.chunk(2, dim=-1)
    out, expected = ops.silu_and_mul(gate_up), F.silu(gate) * up
    assert out.dtype == BF16 and ulps(out, expected).max() <= 1
    assert (out == expected).float().mean() > 0.99


def test_bf16_specials_round_as_torch(ops):
    """Infinities, NaN, subnormals, overflow and ties through the rounding helpers (bf16.h), by way
    of the residual sum: torch's bfloat16 add bit for bit, but for NaN's payload (torch's vector
    code keeps another NaN's bits than its scalar 0x7FC0: NaN where torch has NaN is the contract)."""
    a = torch.tensor([float("inf"), -float("inf"), float("nan"), 1e-39, 3.0e38, 1.0, -2.5, 0.0] * 8)
    b = torch.tensor([1.0, -1.0, 1.0, 1e-39, 3.0e38, 2.0 ** -8, 2.0 ** -9, -0.0] * 8)
    x, residual = a.to(BF16), b.to(BF16)
    expected = residual + x
    ops.rms_norm(x, torch.ones(64, dtype=BF16), 1e-5, residual)
    nan = expected.isnan()
    assert torch.equal(residual.isnan(), nan) and nan.any()
    assert torch.equal(residual[~nan].view(torch.int16), expected[~nan].view(torch.int16))


def test_avx2_only_build_gives_the_same_bits(ops):
    """Built as for an AVX2-only machine (-mno-avx512f: no AVX-512 at all, so no AVX-512 BF16), the
    bfloat16 ops give the same bits as this machine's build: the conversions are integer code."""
    from pagedserve.worker.cpu import native
    from pagedserve.worker.cpu.ops import FLAGS, SOURCE, CpuOps

    lib = native.load(SOURCE, [*FLAGS, "-mno-avx512f"], "test")
    assert lib is not None
    avx2 = CpuOps(lib)
    g = torch.Generator().manual_seed(11)
    x, residual = (torch.randn(33, 576, generator=g).to(BF16) for _ in range(2))
    weight = (torch.rand(576, generator=g) + 0.5).to(BF16)
    res_a, res_b = residual.clone(), residual.clone()
    assert torch.equal(ops.rms_norm(x, weight, 1e-5, res_a), avx2.rms_norm(x, weight, 1e-5, res_b))
    assert torch.equal(res_a, res_b)
    gate_up = (torch.randn(33, 2 * 96, generator=g) * 4).to(BF16)
    assert torch.equal(ops.silu_and_mul(gate_up), avx2.silu_and_mul(gate_up))
    rotary = RotaryEmbedding(64, 512, {"rope_theta": 10000.0, "rope_type": "default"})
    rotary.build(torch.device("cpu"))
    positions = torch.randint(0, 512, (33,), generator=g)
    q_a = torch.randn(33, 9, 64, generator=g).to(BF16)
    q_b = q_a.clone()
    ops.rotary(q_a, positions, rotary.cos_sin)
    avx2.rotary(q_b, positions, rotary.cos_sin)
    assert torch.equal(q_a, q_b)


def test_a_changed_header_rebuilds_the_library(tmp_path, monkeypatch):
    """native.build keys a library by its source and the headers beside it (bf16.h): a header
    edited in place gives a new library, not the stale one."""
    from pagedserve.worker.cpu import native

    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "value.h").write_text("#define VALUE 1\n")
    (src / "f.c").write_text('#include "value.h"\nint value(void) { return VALUE; }\n')
    first = native.load_function(src / "f.c", native.BASE_FLAGS, "test", "value", [], ctypes.c_int)
    (src / "value.h").write_text("#define VALUE 2\n")
    second = native.load_function(src / "f.c", native.BASE_FLAGS, "test", "value", [], ctypes.c_int)
    assert (first(), second()) == (1, 2)
