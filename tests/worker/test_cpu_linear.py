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


def test_bf16_model_runs_on_packed_onednn_within_bf16_rounding_of_nn_linear():
    """A bfloat16 model's linears go to oneDNN on the packed weight (where this CPU times that
    faster than F.linear: forced here) and compute what nn.Linear computes in bfloat16, to the
    rounding of a bfloat16 output (8 significant bits: 2^-8 relative, plus another summation order)."""
    from unittest import mock

    from pagedserve.worker.cpu import linear as cpu_linear

    if not cpu_linear.bf16_onednn_available():
        pytest.skip("this torch has no oneDNN bfloat16 on this CPU")
    g = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Linear(576, 960), nn.ReLU(), nn.Linear(960, 64, bias=False)).bfloat16()
    with torch.inference_mode():
        for layer in (model[0], model[2]):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.05)
        w0, b0, w2 = model[0].weight.clone(), model[0].bias.clone(), model[2].weight.clone()
        with mock.patch.object(cpu_linear, "choose_bf16_path", return_value="onednn"):
            what = prepare_linears(model)
        assert what == "2 bfloat16 linear layers: 960x576: oneDNN packed, 64x960: oneDNN packed"
        assert sum(isinstance(m, cpu_linear.PackedLinear) for m in model.modules()) == 2
        for rows in (1, 8, 64, 512):
            x = torch.randn(rows, 576, generator=g).bfloat16()
            reference = nn.functional.linear(torch.relu(nn.functional.linear(x, w0, b0)), w2)
            got = model(x)
            assert got.dtype == torch.bfloat16
            torch.testing.assert_close(got.float(), reference.float(), rtol=2e-2, atol=2e-2)


def test_bf16_path_choice_keeps_f_linear_where_onednn_is_slower():
    """choose_bf16_path times both at one row: a oneDNN call made slow loses, and prepare_linears
    then leaves that shape's linears as nn.Linear."""
    import time
    from unittest import mock

    from pagedserve.worker.cpu import linear as cpu_linear

    if not cpu_linear.bf16_onednn_available():
        pytest.skip("this torch has no oneDNN bfloat16 on this CPU")
    linear = nn.Linear(96, 80).bfloat16()
    slow = cpu_linear.PackedLinear(linear)
    fast_forward = slow.forward
    slow.forward = lambda x: (time.sleep(0.01), fast_forward(x))[1]
    assert cpu_linear.choose_bf16_path(linear, slow) == "torch"
    model = nn.Sequential(linear)
    with mock.patch.object(cpu_linear, "choose_bf16_path", return_value="torch"):
        assert prepare_linears(model) == "1 bfloat16 linear layers: 80x96: F.linear"
    assert isinstance(model[0], nn.Linear)
