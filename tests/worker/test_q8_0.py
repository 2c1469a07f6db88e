"""The Q8_0 x Q8_0 dot-product linear (worker/cpu/q8_0.c): the activation quantized per 32 as
Q8_0 quantizes, each build (this CPU's, AVX2-only, scalar) equal to a float64 sum of the same
integer products and scales to float32 rounding, and within the activation's quantization error
of the float32 linear on the dequantized blocks.
"""
import pytest
import torch

from pagedserve.worker.cpu import features, native, q8_0

MAX_ROWS = 16
# builds: this CPU's (AVX-512 VNNI's 64-byte path here), 256-bit AVX-VNNI's with AVX-512 off, AVX2's
# maddubs/madd with AVX-512 and VNNI off, scalar; each where this CPU runs it
BUILDS = {"native": [], "avxvnni": ["-mno-avx512f"], "avx2": ["-mno-avx512f", "-mno-avx512vnni", "-mno-avxvnni"],
          "scalar": ["-mno-avx2"]}
NEEDS = {"avxvnni": "avx_vnni", "avx2": "avx2"}


@pytest.fixture(scope="module", params=list(BUILDS))
def kernel(request):
    if request.param in NEEDS and NEEDS[request.param] not in features.cpu_flags():
        pytest.skip(f"the CPU has no {NEEDS[request.param]}")
    built = q8_0.Q8_0Kernel.built(native.BASE_FLAGS + BUILDS[request.param])
    if request.param != "native":
        assert built.path == request.param
    return built


def quantize_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 of x [M, K] in torch, as cpu/q8_0.c writes it (float32: d = max|x| / 127,
    q = round-half-even(x * (1 / d)), zero codes where d is below FLT_MIN)."""
    blocks = x.view(x.shape[0], -1, 32)
    d = blocks.abs().amax(-1) / 127
    inverse = torch.where(d >= torch.finfo(torch.float32).tiny, 1 / d, torch.zeros_like(d))
    return (blocks * inverse[..., None]).round().to(torch.int8).view_as(x), d


def random_q8_0(n: int, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes int8 [N, K] over the whole range (-128 included: a file may hold it), scales [N, K/32]
    as a file's fp16 ones."""
    codes = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=generator)
    scales = (torch.rand(n, k // 32, generator=generator) * 2e-3).half().float()
    return codes, scales


def products(x_codes, x_scales, codes, scales, magnitude=False):
    """Per (m, n, block): the block's scale product times its integer dot product (with
    `magnitude`, times the sum of the products' magnitudes), float64 [M, N, K/32]."""
    m, n = x_codes.shape[0], codes.shape[0]
    each = x_codes.double().view(m, 1, -1, 32) * codes.double().view(1, n, -1, 32)
    dots = each.abs().sum(-1) if magnitude else each.sum(-1)
    return dots * (x_scales.double()[:, None] * scales.double()[None]).abs()


SHAPES = [(m, 33, 576) for m in range(1, MAX_ROWS + 1)] + [(m, 7, k) for k in (32, 1536) for m in (1, 3, 16)]


def test_activation_is_quantized_as_q8_0(kernel):
    x = torch.randn(5, 576) * torch.logspace(-3, 2, 576)
    x[1, :32] = 0  # a zero block: scale 0, codes 0
    q, d = kernel.quantize(x)
    want_q, want_d = quantize_reference(x)
    assert torch.equal(d, want_d) and torch.equal(q, want_q)
    assert q.abs().max() == 127 and d[1, 0] == 0


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_kernel_is_the_float64_sum_of_the_same_products_to_float32_rounding(kernel, m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + k)
    codes, scales = random_q8_0(n, k, g)
    x = torch.randn(m, k, generator=g)
    quantized = quantize_reference(x)
    terms = products(*quantized, codes, scales)
    y = kernel.linear(x, codes, scales)
    assert y.shape == (m, n) and y.dtype == torch.float32
    # float32: each block's scale product rounded once, then lanes of partial sums of products
    # (exact integers) scaled and summed over K/32 blocks and 8 lanes: relative to the magnitudes
    bound = (k // 32 + 8) * 2.0 ** -23 * products(*quantized, codes, scales, magnitude=True).sum(-1)
    assert ((y.double() - terms.sum(-1)).abs() <= bound).all()


@pytest.mark.parametrize("m,n,k", [(1, 33, 576), (16, 7, 1536)])
def test_kernel_is_within_the_activations_quantization_error_of_the_float_linear(kernel, m, n, k):
    """Quantizing x moves each x_j by at most half its block's step d_x (x_j = d_x q_j + e_j,
    |e_j| <= d_x / 2), so |y - x W^T| <= sum_b d_x,b / 2 * sum_(j in b) |w_j|: stated exactly,
    plus float32 rounding (2^-20 of sum |x| |w|)."""
    g = torch.Generator().manual_seed(k)
    codes, scales = random_q8_0(n, k, g)
    weight = (codes.float().view(n, -1, 32) * scales[..., None]).view(n, k)  # the dequantized blocks
    x = torch.randn(m, k, generator=g)
    _, d = quantize_reference(x)
    bound = (d.double()[:, None] / 2 * weight.double().abs().view(1, n, -1, 32).sum(-1)).sum(-1)
    bound += 2.0 ** -20 * (x.double().abs() @ weight.double().abs().t())
    exact = x.double() @ weight.double().t()
    error = (kernel.linear(x, codes, scales).double() - exact).abs()
    assert (error <= bound).all()
    assert error.max() > 1e-3 * bound.max()  # the activation was quantized for real


def test_a_non_finite_activation_makes_its_outputs_nan_not_finite(kernel):
    """A float matmul gives a non-finite output for a NaN or infinite input; the kernel must not
    hide one behind its quantization (max |x| ignores a NaN, and inf * 0 is no code)."""
    g = torch.Generator().manual_seed(3)
    codes, scales = random_q8_0(5, 96, g)
    q4 = random_q4(5, 96, g)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(3, 96, generator=g)
        x[1, 40] = bad
        for y in (kernel.linear(x, codes, scales), kernel.q4_linear(x, q8_0.pack_q4(q4[0]), q4[1], q4[2])):
            assert y[1].isnan().all() and y[[0, 2]].isfinite().all()


def test_kernel_refuses_a_row_length_that_is_no_multiple_of_32(kernel):
    codes, scales = torch.zeros(4, 48, dtype=torch.int8), torch.zeros(4, 1)
    with pytest.raises(ValueError, match="multiple of 32"):
        kernel.linear(torch.zeros(1, 48), codes, scales)


def test_this_cpus_build_takes_its_vnni_path_where_the_compiler_targets_it():
    flags = features.cpu_flags()
    want = "avx512vnni" if {"avx512_vnni", "avx512vl"} <= flags else "avxvnni" if "avx_vnni" in flags else \
        "avx2" if {"avx2", "fma"} <= flags else "scalar"
    assert q8_0.kernel().path == want


# 4-bit weights (Q4_0, Q4_1, Q4_K's sub-blocks: w = d q + m a block of 32) against the same quantized x


def random_q4(n: int, k: int, generator: torch.Generator):
    codes = torch.randint(0, 16, (n, k), generator=generator)
    d = (torch.rand(n, k // 32, generator=generator) * 1e-2).half().float()
    m = (-torch.rand(n, k // 32, generator=generator) * 8e-2).half().float()
    return codes, d, m


@pytest.mark.parametrize("k", [32, 64, 96, 576])
def test_q4_codes_are_packed_two_a_byte_in_the_kernels_order_and_back(k):
    codes = torch.randint(0, 16, (3, k), generator=torch.Generator().manual_seed(k))
    packed = q8_0.pack_q4(codes)
    assert packed.shape == (3, k // 2) and packed.dtype == torch.uint8
    assert torch.equal(q8_0.unpack_q4(packed), codes.to(torch.uint8))
    if k >= 64:  # a pair's byte 0: block 0's weight 0 and, high, position 32's (block 0, weight 16)
        assert packed[0, 0] == codes[0, 0] | (codes[0, 16] << 4)
        # byte 4: position 4 (block 1's weight 0) and position 36 (block 1's weight 16)
        assert packed[0, 4] == codes[0, 32] | (codes[0, 48] << 4)
    if (k // 32) % 2:  # a last, unpaired block as ggml's Q4_0
        last = codes[0, -32:]
        assert torch.equal(packed[0, -16:], (last[:16] | (last[16:] << 4)).to(torch.uint8))


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_q4_kernel_is_the_float64_sum_of_the_same_products_to_float32_rounding(kernel, m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + k + 1)
    codes, d, minimum = random_q4(n, k, g)
    x = torch.randn(m, k, generator=g)
    x_codes, x_scales = quantize_reference(x)
    # d_w d_x (q . x_q) + m_w d_x sum(x_q) per block, in float64, and the magnitudes
    each = x_codes.double().view(m, 1, -1, 32) * codes.double().view(1, n, -1, 32)
    x_sums = x_codes.double().view(m, -1, 32).sum(-1) * x_scales.double()  # [M, K/32]
    terms = each.sum(-1) * d.double()[None] * x_scales.double()[:, None] + minimum.double()[None] * x_sums[:, None]
    magnitude = (each.abs().sum(-1) * d.double()[None] * x_scales.double()[:, None]
                 + (minimum.double()[None] * x_sums[:, None]).abs())
    y = kernel.q4_linear(x, q8_0.pack_q4(codes), d, minimum)
    assert y.shape == (m, n)
    bound = (k // 32 + 8) * 2.0 ** -23 * magnitude.sum(-1)
    assert ((y.double() - terms.sum(-1)).abs() <= bound).all()


def test_q4_kernel_is_within_the_activations_quantization_error_of_the_float_linear(kernel):
    """As for Q8_0: |y - x W^T| <= sum_b d_x,b / 2 * sum_(j in b) |w_j| (+ float32 rounding)."""
    g = torch.Generator().manual_seed(7)
    codes, d, minimum = random_q4(9, 1536, g)
    weight = (codes.double().view(9, -1, 32) * d.double()[..., None] + minimum.double()[..., None]).view(9, 1536)
    x = torch.randn(4, 1536, generator=g)
    _, x_scales = quantize_reference(x)
    bound = (x_scales.double()[:, None] / 2 * weight.abs().view(1, 9, -1, 32).sum(-1)).sum(-1)
    bound += 2.0 ** -20 * (x.double().abs() @ weight.abs().t())
    error = (kernel.q4_linear(x, q8_0.pack_q4(codes), d, minimum).double() - x.double() @ weight.t()).abs()
    assert (error <= bound).all() and error.max() > 1e-3 * bound.max()
