"""The fused-MoE Triton kernel (kernels/fused_moe.py) against its plain-torch reference, and the
alignment it runs on: tokens sorted by expert, each expert's run padded to the M tile, idle
experts with no tile. Without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1,
set by tests/conftest.py before triton is imported), on small shapes."""
import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

from pagedserve.kernels.fused_moe import _moe_down_kernel, _moe_gate_up_kernel, align, fused_moe, fused_moe_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [(torch.float32, 1e-4)] + ([(torch.bfloat16, 3e-2)] if DEVICE == "cuda" else [])


def test_interpreter_is_used_on_cpu():
    if DEVICE == "cuda":
        pytest.skip("compiled kernels on CUDA")
    assert isinstance(_moe_gate_up_kernel, InterpretedFunction) and isinstance(_moe_down_kernel, InterpretedFunction)


def test_align_groups_pairs_by_expert_and_pads_each_run():
    ids = torch.tensor([[3, 0], [0, 3], [5, 0]])  # experts 1, 2, 4 get nothing
    sorted_pairs, block_expert = align(ids, num_experts=6, block_m=4)
    invalid = ids.numel()
    # expert 0: pairs 1, 2, 5; expert 3: pairs 0, 3; expert 5: pair 4; each run padded to 4 rows
    assert sorted_pairs.tolist()[:12] == [1, 2, 5, invalid, 0, 3, invalid, invalid, 4, invalid, invalid, invalid]
    assert (sorted_pairs[12:] == invalid).all()
    assert block_expert.tolist()[:3] == [0, 3, 5] and (block_expert[3:] == -1).all()
    assert sorted_pairs.numel() == block_expert.numel() * 4 >= ids.numel() + 6 * 3


def routing(num_tokens, num_experts, top_k, gen, idle=()):
    """Random distinct experts per token, never those in `idle`; weights like a router's."""
    allowed = torch.tensor([e for e in range(num_experts) if e not in idle])
    scores = torch.rand(num_tokens, len(allowed), generator=gen)
    ids = allowed[scores.topk(top_k, dim=-1).indices]
    weights = torch.softmax(torch.randn(num_tokens, top_k, generator=gen), -1)
    return weights, ids


@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("num_tokens,num_experts,top_k,hidden,inter,idle", [
    (1, 4, 2, 64, 32, ()),  # a decode: two experts with work, two without
    (7, 8, 2, 64, 32, (1, 6)),
    (40, 8, 2, 48, 40, (0,)),  # dims that are not multiples of the tiles
    (33, 4, 3, 32, 16, ()),
])
def test_fused_moe_matches_reference(num_tokens, num_experts, top_k, hidden, inter, idle, dtype, atol):
    gen = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, hidden, generator=gen).to(DEVICE, dtype)
    gate_up = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(DEVICE, dtype)
    down = (torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5).to(DEVICE, dtype)
    weights, ids = routing(num_tokens, num_experts, top_k, gen, idle)
    weights, ids = weights.to(DEVICE), ids.to(DEVICE)
    got = fused_moe(x, gate_up, down, weights, ids)
    expected = fused_moe_reference(x, gate_up, down, weights, ids)
    assert got.shape == (num_tokens, hidden) and got.dtype == dtype
    torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=atol)


def test_every_token_to_one_expert():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20, 32, generator=gen)
    gate_up, down = torch.randn(4, 32, 32, generator=gen) / 6, torch.randn(4, 32, 16, generator=gen) / 4
    ids = torch.full((20, 1), 2)
    weights = torch.ones(20, 1)
    got = fused_moe(x.to(DEVICE), gate_up.to(DEVICE), down.to(DEVICE), weights.to(DEVICE), ids.to(DEVICE))
    gate, up = (x @ gate_up[2].T).chunk(2, -1)
    torch.testing.assert_close(got.cpu(), (torch.nn.functional.silu(gate) * up) @ down[2].T, atol=1e-4, rtol=1e-4)
