"""The CPU linears (worker/cpu/linear.py): the C loop of cpu/linear.c for up to 128 rows, oneDNN
above, against nn.Linear: row counts on both sides of the matrix-vector loop's limit (8), of the
panel width (16) and of the switch to oneDNN (128),
weights whose rows are no multiple of the strip (6), odd input widths, biases, 3-D and strided
inputs."""
import pytest
import torch
from torch import nn

from pagedserve.worker.cpu.linear import MAX_KERNEL_ROWS, CpuLinear, linear_rows, prepare_linears


@pytest.fixture(scope="module")
def kernel():
    k = linear_rows()
    assert k is not None, "the C compiler should build cpu/linear.c on this machine (x86-64 with AVX2)"
    return k


@pytest.mark.parametrize("rows", [1, 2, 4, 8, 9, 16, 17, 64, MAX_KERNEL_ROWS, MAX_KERNEL_ROWS + 1, 300])
@pytest.mark.parametrize("in_features,out_features,bias", [(576, 960, False), (37, 13, True), (64, 6, True)])
def test_matches_nn_linear(kernel, rows, in_features, out_features, bias):
    g = torch.Generator().manual_seed(rows * 1000 + out_features)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=g))
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=g))
    x = torch.randn(rows, in_features, generator=g)
    with torch.inference_mode():
        got, want = CpuLinear(linear, kernel)(x), linear(x)
    # Sums of up to 576 products of unit normals, in another order than MKL's: a few ulp of ~24.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5 * in_features ** 0.5)


def test_three_dimensional_and_strided_inputs(kernel):
    g = torch.Generator().manual_seed(7)
    linear = nn.Linear(48, 20)
    x = torch.randn(3, 5, 96, generator=g)[..., ::2]  # [3, 5, 48], not contiguous
    with torch.inference_mode():
        got = CpuLinear(linear, kernel)(x)
        torch.testing.assert_close(got, linear(x), rtol=1e-5, atol=1e-5)
    assert got.shape == (3, 5, 20)


def test_prepare_linears_swaps_every_linear_and_keeps_outputs(kernel):
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 10, bias=False)))
    x = torch.randn(9, 32, generator=g)
    with torch.inference_mode():
        want = model(x)
        assert prepare_linears(model).startswith("2 linear layers: cpu/linear.c")
        assert not any(isinstance(m, nn.Linear) for m in model.modules())
        assert sum(isinstance(m, CpuLinear) for m in model.modules()) == 2
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_the_faster_small_rows_path_is_chosen_and_both_match_nn_linear(kernel):
    """choose_small_rows_path keeps the C loop unless F.linear is faster on this CPU; a C loop
    made slow (a sleep around it) loses, and either path computes what nn.Linear computes."""
    import time

    from pagedserve.worker.cpu.linear import choose_small_rows_path

    torch.manual_seed(0)
    linear = nn.Linear(96, 80)
    slow = CpuLinear(linear, kernel)
    fast_kernel_forward = slow.kernel_forward
    slow.kernel_forward = lambda x: (time.sleep(0.002), fast_kernel_forward(x))[1]
    assert choose_small_rows_path(slow) == "torch"
    x = torch.randn(3, 96)
    for path in ("c", "torch"):
        module = CpuLinear(linear, kernel)
        module.small_rows = path
        with torch.inference_mode():
            torch.testing.assert_close(module(x), linear(x), rtol=1e-4, atol=1e-5)
