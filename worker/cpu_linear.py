"""Prepacked oneDNN linears: the one speed trick of the CPU serving path.

nn.Linear on CPU calls MKL's sgemm with the weight as stored. oneDNN can reorder a weight once
into the blocked layout its kernels stream best; for the skinny matmuls of a decode step
(a few dozen rows against a large weight) that is 1.5-3x faster on the CPUs measured (the LM
head most of all), which is most of a CPU step. It goes through a private torch op, so
packing is checked against nn.Linear and skipped, with a log line, where it is unavailable.
"""
import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def _packing_works(linear: nn.Linear) -> bool:
    x = torch.randn(3, linear.in_features, dtype=linear.weight.dtype)
    with torch.inference_mode():
        return torch.allclose(PackedLinear(linear)(x), F.linear(x, linear.weight, linear.bias), rtol=1e-3, atol=1e-3)


def pack_linears(model: nn.Module) -> int:
    """Swap every nn.Linear of a float32 CPU model for a PackedLinear; returns how many."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears or linears[0][1].weight.device.type != "cpu" or linears[0][1].weight.dtype != torch.float32:
        return 0
    try:
        if not (torch.backends.mkldnn.is_available() and _packing_works(linears[0][1])):
            raise RuntimeError("results differ from nn.Linear")
    except Exception as e:  # a torch without the op, or one that changed it
        log.warning("oneDNN weight packing unavailable (%s): using nn.Linear", e)
        return 0
    for name, linear in linears:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, PackedLinear(linear))
    return len(linears)
