"""Weight-only quantized linears on the CPU, through torch's own kernels (ATen's, kept by torch
for torchao): int4 in groups of 32 along the input (`_weight_int4pack_mm_for_cpu`,
w = (q - 8) * scale + zero) and int8 per output channel (`_weight_int8pack_mm`).

Those ops are fast only with bfloat16 activations, scales and zeros (AVX-512 BF16 paths; with
float32 they take a scalar path 5-30x slower than a float32 linear): a decode step's few rows go
through them in bfloat16 and come back as float32. They lose to a plain matmul at prefill sizes,
so above MAX_QUANT_ROWS rows the weight is dequantized to float32 on the fly instead (the same
values as the GGUF's own dequantization, to float rounding).

GGUF's Q4_0 (w = d * (q - 8)) and Q4_1 (w = d * q + m) blocks are 32 weights of one row with one
fp16 scale (and minimum): they map onto the int4 op's groups with zero = 0 and zero = m + 8 d.
Q4_K's super-blocks of 256 weights are 8 sub-blocks of 32, each w = (d * sc) * q - dmin * mn
(fp16 d and dmin, 6-bit sc and mn): exactly a group-32 affine int4, scale d * sc and minimum
-dmin * mn, both exact in float32 (an 11-bit fp16 mantissa times a 6-bit integer).
The bfloat16 rounding of activations, scales and zeros is the price of the fast path (relative
error about 2^-8 a term; Q4_K's scales, up to 17 significant bits, lose the most to it);
tests/worker/test_gguf.py states the bound on logits.
`quantize_int4` / `quantize_int8` make the same layouts from a float weight (`--quantization`).

The int8 op takes one scale per output channel, while GGUF's Q8_0 (32 int8 weights and an fp16
d a block), Q6_K (6-bit codes, an int8 scale per 16 and an fp16 d per 256), Q5_K, Q5_0 and Q5_1
scale each block: the exact float32 weight (gguf.quants.dequantize's, which the loader holds) is
requantized per channel (`quantize_int8`: scale = the row's largest |w| / 127, round to nearest).
That adds at most half a step of the row's scale to each weight (|error| <= max|w_row| / 254;
Q8_0's own is max|w_block| / 254, Q6_K's max|w_block| / 62), about what `--quantization int8`
adds to a float weight; tests/worker/test_gguf.py states the bound on logits. A linear fused of
4-bit and other blocks (Q4_K_M's qkv with a Q6_K or Q8_0 v_proj), or a 4-bit one whose shape the
int4 packing refuses, goes the int8 way too. Prefill still runs on the weight that the int8 codes
hold (not the GGUF's exact one), so both paths serve one model.

A linear stored all in Q8_0 has a second way, chosen where this CPU times it faster at one row
(`choose_own_kernel`, cached per CPU): Q8_0Linear keeps the file's blocks as they are and runs up to
MAX_QUANT_ROWS rows through cpu/q8_0.c, which quantizes the activation per 32 as Q8_0 too and
sums int8 x int8 products (llama.cpp's approach); no requantization, and prefill on the exact
weight.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.worker.cpu import kernel_choices, q8_0
from pagedserve.worker.cpu.linear import replace_module
from pagedserve.worker.cpu.timing import fastest

log = logging.getLogger(__name__)

GROUP = 32  # GGUF's block length, and the int4 op's group size here
MAX_QUANT_ROWS = 16  # up to this many rows the int ops win (measured at 1-256 rows, SmolLM2 shapes)


def q4_blocks(data: np.ndarray, qtype_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0/Q4_1 blocks uint8 [N, K/32 * bytes] -> codes int32 [N, K] in [0, 16), d and m float32
    [N, K/32] (m = -8 d for Q4_0), so that the weight is d * codes + m (ggml's block_q4_0/q4_1:
    fp16 d, for Q4_1 fp16 m, then 16 bytes: low nibbles are weights 0-15, high nibbles 16-31)."""
    header = 2 if qtype_name == "Q4_0" else 4
    n = data.shape[0]
    blocks = np.ascontiguousarray(data).reshape(n, -1, header + 16)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)[..., 0]
    qs = blocks[..., header:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, -1).astype(np.int32)
    if qtype_name == "Q4_0":
        m = -8 * d
    else:
        m = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)[..., 0]
    return torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(m)


def q4_k_blocks(data: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K super-blocks uint8 [N, K/256 * 144] -> codes int32 [N, K] in [0, 16), d and m float32
    [N, K/32] (d = d_super * sc, m = -dmin * mn), so that the weight is d * codes + m, bit for bit
    gguf.quants.dequantize's d * q - dm (ggml's block_q4_K: fp16 d, fp16 dmin, 12 bytes of eight
    6-bit scales and mins, then 128 bytes: each 32 bytes hold sub-block 2i in their low nibbles
    and 2i + 1 in their high ones)."""
    n = data.shape[0]
    blocks = np.ascontiguousarray(data).reshape(n, -1, 144)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)
    dmin = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
    low, high, mixed = (blocks[..., 4 + 4 * i:8 + 4 * i] for i in range(3))
    # sub-blocks 0-3: 6 low bits of bytes 0-3 (scales) and 4-7 (mins); 4-7: a nibble of bytes 8-11
    # and the two top bits of bytes 0-3 (scales) and 4-7 (mins)
    sc = np.concatenate([low & 0x3F, (mixed & 0x0F) | ((low >> 2) & 0x30)], axis=-1).astype(np.float32)
    mn = np.concatenate([high & 0x3F, (mixed >> 4) | ((high >> 2) & 0x30)], axis=-1).astype(np.float32)
    qs = blocks[..., 16:].reshape(n, -1, 4, 1, 32)
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=3).reshape(n, -1).astype(np.int32)
    scale, minimum = (d * sc).reshape(n, -1), -(dmin * mn).reshape(n, -1)
    return torch.from_numpy(codes), torch.from_numpy(scale), torch.from_numpy(minimum)


def int4_blocks(data: np.ndarray, qtype_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Any 4-bit GGUF type (INT4_TYPES) -> codes [N, K], d and m [N, K/32]: weight = d * codes + m."""
    return q4_k_blocks(data) if qtype_name == "Q4_K" else q4_blocks(data, qtype_name)


def q8_0_blocks(data: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 blocks uint8 [N, K/32 * 34] -> codes int8 [N, K] and scales float32 [N, K/32], the
    weight being scale * code (ggml's block_q8_0: an fp16 d, then 32 int8 codes)."""
    n = data.shape[0]
    blocks = np.ascontiguousarray(data).reshape(n, -1, 2 + GROUP)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)[..., 0]
    codes = blocks[..., 2:].copy().view(np.int8).reshape(n, -1)
    return torch.from_numpy(codes), torch.from_numpy(d)


class Int4Linear(nn.Module):
    """y = x W^T (+ b), W [N, K] held as int4 codes in groups of 32 with a scale and a zero each.
    x float32 [..., K] -> float32 [..., N]. K must be a multiple of 32."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        # [K/32, N, 2]: scale then zero of each group, in the op's own convention (q - 8) * s + z
        self.scale_zero = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
        # for prefill: codes a byte each, exact float32 scale and zero
        self.codes, self.scale, self.zero = codes.to(torch.uint8), scale.float(), zero.float()
        self.bias = bias

    @classmethod
    def from_affine(cls, codes, d, m, bias=None) -> "Int4Linear":
        """From w = d * codes + m (d, m [N, K/32]): zero = m + 8 d."""
        return cls(codes, d, m + 8 * d, bias)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight [N, K]: (q - 8) * scale + zero per group."""
        groups = self.codes.view(self.out_features, -1, GROUP).float() - 8
        return (groups * self.scale[..., None] + self.zero[..., None]).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] > MAX_QUANT_ROWS:
            y = F.linear(rows, self.dequantized())
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                rows.to(torch.bfloat16).contiguous(), self.packed, GROUP, self.scale_zero).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {GROUP}"


class Int8Linear(nn.Module):
    """y = x W^T (+ b), W [N, K] held as int8 with one float32 scale per output channel.
    x float32 [..., K] -> float32 [..., N]."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.codes, self.scale, self.bias = codes.contiguous(), scale.float().contiguous(), bias
        self.scale_bf16 = self.scale.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] > MAX_QUANT_ROWS:
            y = F.linear(rows, self.codes.float() * self.scale[:, None])
        else:
            y = torch.ops.aten._weight_int8pack_mm(rows.to(torch.bfloat16).contiguous(), self.codes,
                                                   self.scale_bf16).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


class BlockLinear(nn.Module):
    """A linear on a GGUF file's own blocks, run by cpu/q8_0.c: its subclasses say how the kernel
    takes a few rows (`few_rows`) and what float32 weight the blocks hold (`dequantized`). x float32
    [..., K] -> float32 [..., N]; up to MAX_QUANT_ROWS rows through the kernel, above (prefill) F.linear
    on the dequantized weight, as Int8Linear does (here the file's exact weight)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] > MAX_QUANT_ROWS or rows.shape[0] == 0:
            y = F.linear(rows.float(), self.dequantized())
        else:
            y = self.few_rows(rows.float())
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


class Q8_0Linear(BlockLinear):
    """y = x W^T (+ b), W [N, K] held exactly as GGUF's Q8_0 blocks: codes int8 [N, K] and a float32
    scale per 32 weights of a row [N, K/32]. A few rows through cpu/q8_0.c (x quantized per 32 as
    Q8_0: an error of at most half a step of x's block a term, tests/worker/test_q8_0.py)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, kernel: q8_0.Q8_0Kernel):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.codes, self.scales, self.bias = codes.contiguous(), scales.float().contiguous(), bias
        self.kernel = kernel

    def dequantized(self) -> torch.Tensor:
        """The float32 weight [N, K]: scale * code per block (gguf.quants.dequantize's values)."""
        blocks = self.codes.view(self.out_features, -1, GROUP).float() * self.scales[..., None]
        return blocks.view(self.out_features, self.in_features)

    def few_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.kernel.linear(rows, self.codes, self.scales)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, Q8_0 blocks (cpu/q8_0.c)"


class Q4Linear(BlockLinear):
    """y = x W^T (+ b), W [N, K] as 4-bit blocks of 32, w = d * q + m (Q4_0, Q4_1, Q4_K's
    sub-blocks: int4_blocks), the codes packed two a byte (q8_0.pack_q4, in the kernel's order),
    d and m float32 [N, K/32] exact. A few rows through cpu/q8_0.c's q4_linear (x quantized per 32
    as Q8_0, int8 x 4-bit dot products)."""

    def __init__(self, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bias: torch.Tensor | None,
                 kernel: q8_0.Q8_0Kernel):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.packed, self.d, self.m = q8_0.pack_q4(codes), d.float().contiguous(), m.float().contiguous()
        self.bias, self.kernel = bias, kernel

    def dequantized(self) -> torch.Tensor:
        """The float32 weight [N, K]: d * q + m per block."""
        codes = q8_0.unpack_q4(self.packed).view(self.out_features, -1, GROUP).float()
        return (codes * self.d[..., None] + self.m[..., None]).view(self.out_features, self.in_features)

    def few_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.kernel.q4_linear(rows, self.packed, self.d, self.m)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 4-bit blocks (cpu/q8_0.c)"


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest in groups of 32 (as GGUF's Q4_1): weight [N, K] float ->
    codes int32 [N, K], d and m float32 [N, K/32] with weight ~= d * codes + m."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // GROUP, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    d = (high - low) / 15
    safe = torch.where(d == 0, torch.ones_like(d), d)
    codes = ((groups - low[..., None]) / safe[..., None]).round().clamp(0, 15).to(torch.int32)
    return codes.reshape(n, k), d, low


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest per output channel: weight [N, K] -> int8 codes, float32 scale [N]."""
    w = weight.float()
    scale = w.abs().amax(-1) / 127
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (w / safe[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def linear_sources(model: nn.Module) -> dict[str, list[str]]:
    """Each nn.Linear of the model by module name, with the checkpoint weights it holds, in row
    order: a fused projection's sections ("...qkv_proj" holds q_proj, k_proj, v_proj), else its own."""
    from pagedserve.worker.models.sharding import Fused

    sources = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        fused = getattr(module, "tp_shards", {}).get("weight")
        if isinstance(fused, Fused):
            parent = name.rpartition(".")[0]
            sources[name] = [f"{parent}.{source}.weight" if parent else f"{source}.weight" for source, _ in fused.sections]
        else:
            sources[name] = [f"{name}.weight"]
    return sources


# A tied LM head has no tensor of its own in a GGUF file (no output.weight): it runs on the
# embedding's blocks (token_embd, often Q8_0 even in a 4-bit file), as llama.cpp runs it, as a
# quantized copy beside the float32 embedding the lookup reads.
TIED_SOURCES = {"lm_head.weight": "model.embed_tokens.weight"}

# GGUF block types whose codes the int4 op runs as they are, and those the int8 op runs
# requantized per channel; others (Q2_K, Q3_K, ...) are dequantized to float32 on load
INT4_TYPES = {"Q4_0", "Q4_1", "Q4_K"}
INT8_TYPES = {"Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q5_1"}


def gguf_method(parts: list, linear: nn.Linear) -> str | None:
    """"int4" when all of a linear's blocks are 4-bit and the int4 packing takes its shape, else
    "int8" when all are quantized types we run (a requantized copy: module docstring), else None."""
    types = {p.type.name for p in parts}
    if parts[0].in_features != linear.in_features:
        return None
    if types <= INT4_TYPES and int4_fits(linear):
        return "int4"
    return "int8" if types <= INT4_TYPES | INT8_TYPES else None


def swap_gguf_linears(model: nn.Module, blocks: dict) -> int:
    """Replace each nn.Linear whose weights are all 4-bit GGUF blocks (Q4_0, Q4_1, Q4_K:
    gguf_checkpoint.QuantBlocks by checkpoint name) with an Int4Linear of the same codes, and each
    other whose weights are all of INT4_TYPES | INT8_TYPES with an Int8Linear (requantized per
    channel; `gguf_method`), or, where all are Q8_0 and cpu/q8_0.c times faster than the int8 op
    (`choose_own_kernel`), a Q8_0Linear on the blocks themselves (4-bit ones likewise a Q4Linear
    where that beats the int4 op); a tied LM head on the embedding's blocks (TIED_SOURCES);
    returns how many were replaced. Others (Q2_K, Q3_K, float) keep their float32 weight, dequantized on load;
    so do all of a kind whose op this CPU runs slower than float32 (`swap_kind`)."""
    kinds: dict[str, list[Candidate]] = {}
    types: dict[str, set[str]] = {}
    for name, names in linear_sources(model).items():
        parts = [blocks.get(source, blocks.get(TIED_SOURCES.get(source))) for source in names]
        if any(p is None for p in parts):
            continue
        linear = model.get_submodule(name)
        method = gguf_method(parts, linear)
        if method is None:
            continue
        build = lambda method=method, parts=parts, linear=linear: gguf_module(
            method, parts, linear.weight.detach(), linear.bias)
        exact = None
        if method == "int8" and all(p.type.name == "Q8_0" for p in parts):
            exact = lambda parts=parts, linear=linear: q8_0_module(parts, linear.bias)
        elif method == "int4":
            exact = lambda parts=parts, linear=linear: q4_module(parts, linear.bias)
        kinds.setdefault(method, []).append(Candidate(name, build, linear.weight.detach(), exact))
        types.setdefault(method, set()).update(p.type.name for p in parts)
    count = 0
    for method, candidates in kinds.items():
        label = "/".join(sorted(types[method]))
        method = choose_own_kernel(model, method, candidates)
        count += swap_kind(model, method, candidates, f"GGUF {label} linears: dequantized to float32 "
                           f"(the {method} op is slower than float32 on this CPU)")
    return count


def q8_0_module(parts: list, bias: torch.Tensor | None) -> "Q8_0Linear":
    """A Q8_0Linear on Q8_0 QuantBlocks' own codes and scales (a linear's parts in row order)."""
    codes, scales = (torch.cat(t) for t in zip(*(q8_0_blocks(p.data) for p in parts)))
    return Q8_0Linear(codes, scales, bias, q8_0.kernel())


def q4_module(parts: list, bias: torch.Tensor | None) -> "Q4Linear":
    """A Q4Linear on 4-bit QuantBlocks' own codes, scales and minimums (a linear's parts in row order)."""
    codes, d, m = (torch.cat(t) for t in zip(*(int4_blocks(p.data, p.type.name) for p in parts)))
    return Q4Linear(codes, d, m, bias, q8_0.kernel())


# Per kind whose linears may run on cpu/q8_0.c instead of torch's op: how the log names the linears,
# the kernel's kind, and the choice's names
Q8_0_NAMES = {"q8_0": "cpu/q8_0.c on the Q8_0 blocks", "int8": "int8 op (requantized per channel)"}
Q4_NAMES = {"q4": "cpu/q8_0.c's 4-bit dot on the blocks", "int4": "int4 op"}
OWN_KERNELS = {"int8": ("Q8_0", "q8_0", Q8_0_NAMES), "int4": ("4-bit", "q4", Q4_NAMES)}


def choose_own_kernel(model: nn.Module, method: str, candidates: list["Candidate"]) -> str:
    """For a kind's linears that cpu/q8_0.c can run on their own blocks (`Candidate.exact`: all-Q8_0
    linears of the int8 kind, every linear of the int4 kind), the faster of that kernel and torch's
    op (at TIMED_ROWS rows; the key says 1 row, the one-user case it is for): cached
    per CPU, else timed on `timed_prefix`'s modules (own_kernel_is_faster), recorded on the model.
    Where the kernel wins, those candidates build its modules (Q8_0Linear, Q4Linear). Returns the
    kind's name for swap_kind: `method`, the kernel's kind ("q8_0", "q4"), or "int8+q8_0" where
    only some linears are all Q8_0."""
    ours = [c for c in candidates if c.exact is not None]
    if method not in OWN_KERNELS or not ours:
        return method
    label, kind, names = OWN_KERNELS[method]
    if q8_0.kernel() is None:
        kernel_choices.record(model, f"{label} linears: {names[method]} (cpu/q8_0.c does not build here)")
        return method
    mib = sum(c.weight.numel() * c.weight.element_size() for c in ours) >> 20
    key = f"{label} linears at 1 row ({len(ours)} of them, {mib} MiB in float32)"
    choice = kernel_choices.decide(model, key, names,
                                   lambda: kind if own_kernel_is_faster(timed_prefix(ours)) else method)
    if choice == method:
        return method
    for candidate in ours:
        candidate.build = candidate.exact
    return kind if len(ours) == len(candidates) else f"{method}+{kind}"


TIMED_ROWS = (1, 4, MAX_QUANT_ROWS)


def own_kernel_is_faster(candidates: list["Candidate"], repeats: int = 7) -> bool:
    """Whether cpu/q8_0.c on the candidates' own blocks (`exact`) beats torch's op on theirs
    (`build`) at 1, 4 and MAX_QUANT_ROWS rows (the range it serves: its integer arithmetic per row
    can lose to the op's beyond one row), all of them one after another as a decode step runs them
    (medians of `repeats` interleaved rounds, cpu/timing.py)."""
    exact = [c.exact() for c in candidates]
    torch_op = [c.build() for c in candidates]
    for rows in TIMED_ROWS:
        xs = [torch.randn(rows, c.weight.shape[1]) for c in candidates]

        def run(modules, xs=xs):
            return lambda: [module(x) for module, x in zip(modules, xs)]
        if fastest({"ours": run(exact), "torch": run(torch_op)}, repeats) != "ours":
            return False
    return True


def gguf_module(method: str, parts: list, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """An Int4Linear on 4-bit blocks' own codes (exact), or an Int8Linear of the float32 `weight`
    [N, K] (the blocks as gguf.quants.dequantize gives them, which the loader filled the linear
    with) requantized per output channel (module docstring); `parts` are a linear's QuantBlocks
    in row order."""
    if method == "int4":
        codes, d, m = (torch.cat(t) for t in zip(*(int4_blocks(p.data, p.type.name) for p in parts)))
        return Int4Linear.from_affine(codes, d, m, bias)
    return Int8Linear(*quantize_int8(weight), bias)


def int4_fits(linear: nn.Linear) -> bool:
    """The int4 op's packing needs in_features in whole groups and out_features a multiple of 16."""
    return linear.in_features % GROUP == 0 and linear.out_features % 16 == 0


def quantize_linears(model: nn.Module, method: str) -> int:
    """--quantization: every nn.Linear (a tied LM head as a quantized copy; the embedding stays
    float32) as an Int8Linear ("int8") or Int4Linear ("int4"); with "int4" the LM head, and any
    linear whose shape the int4 packing refuses (`int4_fits`), goes int8, as a GGUF's Q8_0
    embedding does (the LM head sets the logits directly, and llama.cpp's 4-bit files keep it at
    8 or 6 bits). Each op's linears run quantized only where this CPU runs them faster than
    float32 (`swap_kind`, one decision per op); returns how many were replaced."""
    kinds: dict[str, list[Candidate]] = {}
    for name in list(linear_sources(model)):
        linear = model.get_submodule(name)
        if method == "int4" and name != LM_HEAD and int4_fits(linear):
            kind, build = "int4", lambda linear=linear: Int4Linear.from_affine(
                *quantize_int4(linear.weight.detach()), linear.bias)
        else:
            kind, build = "int8", lambda linear=linear: Int8Linear(*quantize_int8(linear.weight.detach()), linear.bias)
        kinds.setdefault(kind, []).append(Candidate(name, build, linear.weight.detach()))
    count = 0
    for kind, candidates in kinds.items():
        which = "" if kind == method else f" to the LM head and other {kind} linears"
        count += swap_kind(model, kind, candidates, f"--quantization {method}: not applied{which}, float32 "
                           f"weights served (the {kind} op is slower than float32 on this CPU)")
    return count


LM_HEAD = "lm_head"  # the output projection's module name in every model of worker/models/


@dataclass
class Candidate:
    """A linear that may run quantized: its module name, how to build its quantized module, its
    float32 weight [N, K] (what it runs on otherwise), and, for a linear stored all in Q8_0, how to
    build a module of cpu/q8_0.c on its own blocks (choose_own_kernel makes that its build where
    it wins)."""
    name: str
    build: Callable[[], nn.Module]
    weight: torch.Tensor
    exact: Callable[[], nn.Module] | None = None


# The float32 bytes of a kind's linears that its decision times (`timed_prefix`): well above a
# CPU's cache (a core's share of a server's last-level cache is tens of MiB), so that float32
# streams from memory as a decode step's weights do, while a model of GBs builds only a few
# layers' quantized modules before the op is known to win.
TIMED_BYTES = 256 << 20


def swap_kind(model: nn.Module, method: str, candidates: list[Candidate], refused: str) -> int:
    """Swap every candidate linear for its quantized module where the `method` op beats float32
    over all of them (quantized_wins: cached per CPU, else timed on `timed_prefix`'s modules, the
    only ones built before the answer); returns how many were swapped. Where float32 wins, the
    model keeps its linears, the log warns and `refused` is recorded (WorkerInfo.kernel_choices).
    The quantized modules are built one at a time as they replace their linear, so the model's
    float32 weights go as their copies come (a tied LM head's stays: the embedding holds it)."""
    if not candidates:
        return 0
    built: dict[str, nn.Module] = {}

    def time_prefix() -> bool:
        pairs = [(built.setdefault(c.name, c.build()), c.weight) for c in timed_prefix(candidates)]
        return quantized_is_faster(*zip(*pairs))
    if not quantized_wins(model, method, [c.weight for c in candidates], time_prefix):
        log.warning("%s", refused)
        kernel_choices.record(model, refused)
        return 0
    count = len(candidates)
    while candidates:  # popped, so that nothing here holds a replaced linear's weight
        candidate = candidates.pop(0)
        module = built.pop(candidate.name) if candidate.name in built else candidate.build()
        replace_module(model, candidate.name, module)
    return count


def timed_prefix(candidates: list[Candidate]) -> list[Candidate]:
    """The first candidates, in the model's order (whole layers, each shape of a layer once per
    layer), whose float32 weights reach TIMED_BYTES; all of them in a smaller model."""
    total = 0
    for i, candidate in enumerate(candidates):
        total += candidate.weight.numel() * candidate.weight.element_size()
        if total >= TIMED_BYTES:
            return candidates[:i + 1]
    return candidates


def quantized_wins(model: nn.Module, method: str, weights: list[torch.Tensor], time: Callable[[], bool]) -> bool:
    """Whether the `method` op beats float32 over the linears of these float32 `weights`: this
    CPU's cached answer for their count and size (cpu/kernel_choices.py), else `time()`'s,
    recorded on the model."""
    mib = sum(weight.numel() * weight.element_size() for weight in weights) >> 20
    key = f"{method} linears against float32 at 1 row ({len(weights)} of them, {mib} MiB in float32)"
    return kernel_choices.decide(model, key, {"quantized": "quantized", "float32": "float32"},
                                 lambda: "quantized" if time() else "float32") == "quantized"


def quantized_is_faster(modules: tuple[nn.Module, ...], weights: tuple[torch.Tensor, ...], repeats: int = 7) -> bool:
    """Whether the quantized `modules` beat F.linear on the float32 `weights` ([N, K] each) at one
    row, all of them one after another as a decode step runs them (medians of `repeats`
    interleaved rounds, cpu/timing.py). One weight alone would sit in the CPU's cache after the
    first call and time float32 at its best; a model's linears stream from memory, where fewer
    bytes win. The int ops' fast paths need AVX-512 BF16, and no quantized path may be slower
    than the float one it replaces."""
    xs = [torch.randn(1, weight.shape[1]) for weight in weights]

    def quantized():
        for module, x in zip(modules, xs):
            module(x)

    def float32():
        for weight, x in zip(weights, xs):
            F.linear(x, weight)
    return fastest({"quantized": quantized, "float": float32}, repeats) == "quantized"
