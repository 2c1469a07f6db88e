"""The float32 and bfloat16 linears of the CPU serving path.

A decode step multiplies a few dozen rows by every weight, which streams from memory each step:
there, `linear_rows` (cpu/linear.c, compiled on first use) beats oneDNN and MKL by 10-50%
(`python benchmarks/linear.py`). Prefill steps (hundreds to thousands of rows) are compute-bound
and go to oneDNN, which reorders the weight itself on each call (about 2% of a prefill step here).
Both read the weight as the checkpoint stores it, so there is one copy of it.

Where the C file cannot be built (no compiler, no AVX2) every linear goes to oneDNN, with the weight
packed once into its blocked layout instead (`torch.ops.mkldnn._reorder_linear_weight`); where that
private op is missing or disagrees with nn.Linear, nn.Linear stays.

bfloat16 (`prepare_bf16_linears`): oneDNN on the weight packed once, which reaches the CPU's
AMX / AVX-512 BF16 units: on SmolLM2-135M's shapes 1.06-2x F.linear in bfloat16 at 1-512 rows
(`python benchmarks/bf16_linear.py`, docs/performance/cpu-quantized.md); each weight shape keeps
F.linear where this CPU times that faster at one row.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.worker.cpu import kernel_choices, native
from pagedserve.worker.cpu.timing import fastest

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("linear.c")
# Up to this many rows the C loop wins (measured at 1 to 128 rows); above it, oneDNN.
MAX_KERNEL_ROWS = 128


@functools.cache
def linear_rows():
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    return native.load_function(SOURCE, native.BASE_FLAGS, "linears use oneDNN at every size", "linear_rows",
                                [p, i64, i64, p, p, i64, p], ctypes.c_int)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class CpuLinear(nn.Module):
    """nn.Linear for float32 on the CPU: few rows through `linear_rows`, many through oneDNN."""

    def __init__(self, linear: nn.Linear, kernel):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight.detach().contiguous()
        self.bias = None if linear.bias is None else linear.bias.detach().contiguous()
        self.kernel = kernel

    # "c": few rows through linear_rows; "torch": through F.linear (MKL), where this CPU runs
    # that faster at this shape (choose_small_rows_path, timed once at start-up)
    small_rows = "c"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > MAX_KERNEL_ROWS or rows == 0:
            return onednn_linear(x, self.weight, self.bias)
        if self.small_rows == "torch":
            return F.linear(x, self.weight, self.bias)
        return self.kernel_forward(x)

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()
        y = torch.empty(rows.shape[0], self.out_features, dtype=x.dtype)
        status = self.kernel(rows.data_ptr(), rows.shape[0], self.in_features, self.weight.data_ptr(),
                             None if self.bias is None else self.bias.data_ptr(), self.out_features, y.data_ptr())
        if status != 0:
            raise MemoryError("linear_rows could not allocate its panel buffer")
        return y.view(*x.shape[:-1], self.out_features)


class PackedLinear(nn.Module):
    """oneDNN at every size, the weight reordered once into oneDNN's blocked layout: float32's
    fallback, and bfloat16's fast path. x [..., K] -> [..., N] in the weight's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(x, self.packed, self.bias)


def _matches_nn_linear(module: nn.Module, linear: nn.Linear, tolerance: float = 1e-3) -> bool:
    """Checked at 3 rows (the C loop) and at MAX_KERNEL_ROWS + 1 (oneDNN)."""
    with torch.inference_mode():
        for rows in (3, MAX_KERNEL_ROWS + 1):
            x = torch.randn(rows, linear.in_features, dtype=linear.weight.dtype)
            got, want = module(x).float(), F.linear(x, linear.weight, linear.bias).float()
            if not torch.allclose(got, want, rtol=tolerance, atol=tolerance):
                return False
    return True


def prepare_linears(model: nn.Module) -> str:
    """Swap every nn.Linear of a float32 CPU model for a CpuLinear (or, without the C loop, a
    PackedLinear); returns what was done, for the log."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears and linears[0][1].weight.device.type == "cpu" and linears[0][1].weight.dtype == torch.bfloat16:
        return prepare_bf16_linears(model, linears)
    if not linears:
        return "no nn.Linear left to swap (all quantized, or none)"
    if linears[0][1].weight.device.type != "cpu" or linears[0][1].weight.dtype != torch.float32:
        return "linears left as nn.Linear"
    linears = [(name, m) for name, m in linears if m.weight.dtype == torch.float32]  # the C loop reads float32
    kernel = linear_rows()
    try:
        if not torch.backends.mkldnn.is_available():
            raise RuntimeError("oneDNN is not available")
        make = (lambda lin: CpuLinear(lin, kernel)) if kernel is not None else PackedLinear
        if not _matches_nn_linear(make(linears[0][1]), linears[0][1]):
            raise RuntimeError("results differ from nn.Linear")
    except Exception as e:  # a torch without the private ops, or one that changed them
        log.warning("oneDNN linears unavailable (%s): using nn.Linear", e)
        kernel_choices.record(model, f"float32 linears: nn.Linear (oneDNN unavailable: {e})")
        return "linears left as nn.Linear"
    swapped = []
    for name, linear in linears:
        swapped.append(make(linear))
        replace_module(model, name, swapped[-1])
    what = "cpu/linear.c up to %d rows, oneDNN above" % MAX_KERNEL_ROWS if kernel is not None else "oneDNN, packed"
    if kernel is not None:
        what += "; " + choose_small_rows_paths(model, swapped)
    return f"{len(linears)} linear layers: {what}"


SMALL_ROWS_NAMES = {"c": "cpu/linear.c", "torch": "F.linear"}
BF16_NAMES = {"onednn": "oneDNN packed", "torch": "F.linear"}


def choose_small_rows_paths(model: nn.Module, linears: list[CpuLinear]) -> str:
    """Per weight shape, the faster of cpu/linear.c and F.linear at one row on this CPU (the C
    loop was tuned on AVX2 cores; MKL can beat it on AVX-512 ones), so that no decode path is
    slower than F.linear; cached per CPU and recorded on the model (kernel_choices.py). Returns
    the choices, for the log."""
    choices = {}
    for linear in linears:
        shape = (linear.out_features, linear.in_features)
        if shape not in choices:
            choices[shape] = kernel_choices.decide(model, f"float32 linear {shape[0]}x{shape[1]} at 1 row",
                                                   SMALL_ROWS_NAMES, lambda: choose_small_rows_path(linear))
        linear.small_rows = choices[shape]
    return "at few rows " + ", ".join(f"{n}x{k}: {SMALL_ROWS_NAMES[c]}" for (n, k), c in choices.items())


def choose_small_rows_path(linear: CpuLinear, repeats: int = 15) -> str:
    """"c" or "torch": medians of `repeats` interleaved one-row calls of each."""
    x = torch.randn(1, linear.in_features)
    return fastest({"c": lambda: linear.kernel_forward(x),
                    "torch": lambda: F.linear(x, linear.weight, linear.bias)}, repeats)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Puts `module` where the submodule called `name` (dotted) is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def bf16_onednn_available() -> bool:
    """Whether this torch has oneDNN with bfloat16 support on this CPU (AVX-512 BF16 / AMX, or
    AVX-512 emulation in oneDNN)."""
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def prepare_bf16_linears(model: nn.Module, linears: list[tuple[str, nn.Linear]]) -> str:
    """bfloat16 CPU model: per weight shape, the faster at one row of oneDNN on the packed weight
    (PackedLinear) and F.linear (choose_bf16_path); swaps the linears whose shape chose oneDNN.
    Returns the choices, for the log."""
    first = linears[0][1]
    try:
        if not bf16_onednn_available():
            raise RuntimeError("oneDNN has no bfloat16 on this CPU")
        # bfloat16 outputs: 8 significant bits, and another summation order than F.linear's
        if not _matches_nn_linear(PackedLinear(first), first, tolerance=2e-2):
            raise RuntimeError("results differ from nn.Linear")
    except Exception as e:  # a torch without the private ops, or one that changed them
        log.warning("oneDNN bfloat16 linears unavailable (%s): using nn.Linear", e)
        kernel_choices.record(model, f"bfloat16 linears: nn.Linear (oneDNN unavailable: {e})")
        return "bfloat16 linears left as nn.Linear"
    choices = {}
    for name, linear in linears:
        if linear.weight.dtype != torch.bfloat16:  # one kept in float32 (a MoE router) stays as it is
            continue
        shape = (linear.out_features, linear.in_features)
        packed = None
        if shape not in choices:
            packed = PackedLinear(linear)
            choices[shape] = kernel_choices.decide(model, f"bfloat16 linear {shape[0]}x{shape[1]} at 1 row", BF16_NAMES,
                                                   lambda: choose_bf16_path(linear, packed))
        if choices[shape] == "onednn":
            replace_module(model, name, packed or PackedLinear(linear))
    return f"{len(linears)} bfloat16 linear layers: " + ", ".join(
        f"{n}x{k}: {BF16_NAMES[c]}" for (n, k), c in choices.items())


def choose_bf16_path(linear: nn.Linear, packed: PackedLinear, repeats: int = 15) -> str:
    """"onednn" or "torch": the faster at one bfloat16 row on this CPU (medians of `repeats`)."""
    x = torch.randn(1, linear.in_features, dtype=linear.weight.dtype)
    weight, bias = linear.weight.detach(), linear.bias
    return fastest({"onednn": lambda: packed(x), "torch": lambda: F.linear(x, weight, bias)}, repeats)
