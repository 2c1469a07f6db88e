"""The adapters a worker holds, and the LoRA term of every adapted linear in a mixed batch.

Adapters live in two tiers, as in vLLM: up to `max_cpu_loras` read and sliced on the host (LRU),
and `max_loras` device slots, one per adapter a step may run. Each adapted linear of the model
holds its slots stacked, A [max_loras, R, in] and B [max_loras, out, R] (R: its sections times
--max-lora-rank, zero padded), so a step indexes them by slot. A forward hook on the linear adds
the LoRA term to its output: tokens grouped by slot, one pair of small matmuls per adapter present
(Punica's SGMV, Chen et al. 2023: kernels/sgmv.py on CUDA), none for base-model tokens. A step
without LoRA tokens leaves the hooks idle, so CUDA graphs captured then stay valid for it.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pagedserve.worker.cpu.linear import MAX_KERNEL_ROWS, linear_rows
from pagedserve.worker.lora import LoraAdapter, LoraError, Target, load_adapter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraSpec:
    """Which adapter a sequence runs: its name, directory and content hash (the key of its tiers)."""

    name: str
    path: str
    content_hash: str = ""

    @property
    def key(self) -> str:
        return f"{self.name}\0{self.path}\0{self.content_hash}"


class StepGroups:
    """One step's token rows by device slot: [(slot, row indices [n] on the device, or None
    where the slot has every row)], with the segments SGMV reads (token ranges of one slot each,
    in order)."""

    def __init__(self, token_slots: np.ndarray, device: torch.device):
        self.groups = []
        for slot in np.unique(token_slots[token_slots >= 0]).tolist():
            rows = np.flatnonzero(token_slots == slot)
            self.groups.append((slot, None if len(rows) == len(token_slots) else torch.from_numpy(rows).to(device)))
        change = np.flatnonzero(np.diff(token_slots)) + 1
        starts = np.concatenate([[0], change]).astype(np.int64)
        ends = np.concatenate([change, [len(token_slots)]]).astype(np.int64)
        slots = token_slots[starts]
        keep = slots >= 0
        self.seg_start = torch.from_numpy(starts[keep].astype(np.int32)).to(device)
        self.seg_end = torch.from_numpy(ends[keep].astype(np.int32)).to(device)
        self.seg_slot = torch.from_numpy(slots[keep].astype(np.int32)).to(device)
        self.max_seg_len = int((ends - starts)[keep].max()) if keep.any() else 0


def grouped_lora(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, groups: StepGroups) -> torch.Tensor:
    """The LoRA term [T, out] of x [T, in] for stacked slots a [S, R, in], b [S, out, R]: rows
    grouped by slot, zero for base-model rows. On CUDA the Triton SGMV kernels, else torch."""
    if x.is_cuda:
        from pagedserve.kernels.sgmv import sgmv_lora

        return sgmv_lora(x, a, b, groups.seg_start, groups.seg_end, groups.seg_slot, groups.max_seg_len)
    return add_grouped_lora(torch.zeros(x.shape[0], b.shape[1], dtype=x.dtype, device=x.device), x, a, b, groups)


def add_grouped_lora(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                     groups: StepGroups) -> torch.Tensor:
    """out [T, out] += the LoRA term, in place: per slot one pair of matmuls over its rows
    (gathered, and scattered back with index_add_, unless the slot has every row)."""
    for slot, rows in groups.groups:
        if rows is None:
            out += _linear(_linear(x, a[slot]), b[slot])
        else:
            out.index_add_(0, rows, _linear(_linear(x.index_select(0, rows), a[slot]), b[slot]))
    return out


def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [n, in] @ w [out, in]^T. Decode-sized float32 rows on the CPU go through the C loop the
    model's own linears use (worker/cpu/linear.py): switching to torch's matmul between its calls
    costs far more than the LoRA's few FLOPs where the cores are busy (measured: benchmarks/lora.py)."""
    kernel = linear_rows() if x.device.type == "cpu" and x.dtype == torch.float32 else None
    if kernel is None or x.shape[0] > MAX_KERNEL_ROWS or x.shape[0] == 0:
        return x @ w.t()
    rows = x.contiguous()
    y = torch.empty(rows.shape[0], w.shape[0], dtype=x.dtype)
    if kernel(rows.data_ptr(), rows.shape[0], w.shape[1], w.data_ptr(), None, w.shape[0], y.data_ptr()) != 0:
        raise MemoryError("linear_rows could not allocate its panel buffer")
    return y


class LoraManager:
    def __init__(self, model: nn.Module, targets: dict[str, Target], max_loras: int, max_lora_rank: int,
                 max_cpu_loras: int, dtype: torch.dtype, device: torch.device, prefix: str = ""):
        self.targets, self.max_rank, self.prefix = targets, max_lora_rank, prefix
        self.max_loras, self.max_cpu_loras = max_loras, max(max_cpu_loras, max_loras)
        self.cpu: OrderedDict[str, LoraAdapter] = OrderedDict()  # LRU, oldest first
        self.slots: list[str | None] = [None] * max_loras  # the key each device slot holds
        self.stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, t in targets.items():
            rank = max_lora_rank * len(t.sections)
            self.stacks[name] = (torch.zeros(max_loras, rank, t.in_features, dtype=dtype, device=device),
                                 torch.zeros(max_loras, t.out_features, rank, dtype=dtype, device=device))
            model.get_submodule(name).register_forward_hook(self._hook(name))
        self.device = device
        self.groups: StepGroups | None = None  # set for a step with LoRA tokens

    def _hook(self, name: str):
        def add_lora(module, args, output):
            if self.groups is None:
                return output
            a, b = self.stacks[name]
            if output.is_cuda:
                return output + grouped_lora(args[0], a, b, self.groups)
            return add_grouped_lora(output, args[0], a, b, self.groups)  # fewer ops: each costs on the CPU
        return add_lora

    def adapter(self, spec: LoraSpec) -> LoraAdapter:
        """The adapter from the host tier, read from disk first if absent. Raises LoraError."""
        if spec.key in self.cpu:
            self.cpu.move_to_end(spec.key)
            return self.cpu[spec.key]
        adapter = load_adapter(spec.name, spec.path, self.targets, self.max_rank, self.prefix)
        self.cpu[spec.key] = adapter
        while len(self.cpu) > self.max_cpu_loras:
            self.cpu.popitem(last=False)
        log.info("LoRA adapter %s loaded from %s (rank %d)", spec.name, spec.path, adapter.rank)
        return adapter

    def begin_step(self, seq_specs: list[LoraSpec | None], query_lens: np.ndarray) -> None:
        """Place the step's adapters in device slots and group its tokens by slot; `seq_specs`:
        each sequence's adapter (None: the base model), in the order of the step's tokens, with
        its query_lens [S] tokens. Raises LoraError when more adapters than --max-loras are in
        the step, or one cannot be read."""
        keys = {s.key: s for s in seq_specs if s is not None}
        if not keys:
            self.groups = None
            return
        if len(keys) > self.max_loras:
            raise LoraError(f"a step runs {len(keys)} LoRA adapters, more than --max-loras {self.max_loras}")
        slot_of = {k: i for i, k in enumerate(self.slots) if k in keys}
        free = [i for i, k in enumerate(self.slots) if k not in keys]
        for key, spec in keys.items():
            if key not in slot_of:
                slot_of[key] = slot = free.pop(0)
                self._fill(slot, self.adapter(spec))
                self.slots[slot] = key
        seq_slots = np.fromiter((-1 if s is None else slot_of[s.key] for s in seq_specs), np.int64,
                                count=len(seq_specs))
        self.groups = StepGroups(np.repeat(seq_slots, query_lens), self.device)

    def end_step(self) -> None:
        self.groups = None

    def _fill(self, slot: int, adapter: LoraAdapter) -> None:
        for name, (a_stack, b_stack) in self.stacks.items():
            a_stack[slot].zero_()
            b_stack[slot].zero_()
            if name in adapter.weights:
                a, b = adapter.weights[name]
                a_stack[slot, : a.shape[0]].copy_(a)
                b_stack[slot, :, : b.shape[1]].copy_(b)
