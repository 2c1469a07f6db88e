"""LoRA adapters (Hu et al. 2021) as PEFT saves them, checked against the served model and sliced
for this tensor parallel rank.

A PEFT directory holds `adapter_config.json` (`r`, `lora_alpha`, `target_modules`, `use_rslora`)
and `adapter_model.safetensors` with, per adapted module, `base_model.model.<module>.lora_A.weight`
[r, in] and `...lora_B.weight` [out, r]; the module's output becomes W x + scaling * B (A x), with
scaling = lora_alpha / r, or lora_alpha / sqrt(r) under rsLoRA (Kalajdzievski 2023), as PEFT's
LoraLayer computes it.

The model fuses q/k/v and gate/up into one linear (layers.fused_linear): a LoRA on q_proj adds to
the q section of that linear's output. So each linear of the model is a `Target` with the
checkpoint modules it computes (`Section`s, each with where its output starts and the Shard this
rank holds), and an adapter's A and B for one target are stacked so one pair of matmuls serves
all its sections: A = [A_q; A_k; A_v] ([k r, in]), B block-diagonal ([out, k r], zero where a
section has no LoRA or belongs to another section), scaling folded into B. Under tensor
parallelism A and B are sliced with their layer: a column-parallel layer (output split) keeps its
rows of B, a row-parallel one (input split) its columns of A (sharding.py).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from pagedserve.worker.models.sharding import Fused, Shard

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class LoraError(ValueError):
    """An adapter this model cannot serve: the message says which file and why."""


@dataclass(frozen=True)
class Section:
    name: str  # the checkpoint module it computes: "model.layers.0.self_attn.q_proj"
    offset: int  # where its output starts in the target's output (this rank's)
    out_shard: Shard | None  # this rank's rows of B (an output-split layer); None: all
    in_shard: Shard | None  # this rank's columns of A (an input-split layer); None: all
    out_full: int  # the checkpoint module's output and input features, unsplit
    in_full: int


@dataclass(frozen=True)
class Target:
    module: str  # the model's linear: "model.layers.0.self_attn.qkv_proj"
    in_features: int  # this rank's
    out_features: int
    sections: tuple[Section, ...]


def lora_targets(model: nn.Module) -> dict[str, Target]:
    """Every linear of the model that a LoRA may adapt, by module name (all but the LM head),
    from the Shards the layers attach (read it before the CPU path swaps the nn.Linears)."""
    targets = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.rpartition(".")[2] == "lm_head":
            continue
        shard = getattr(module, "tp_shards", {}).get("weight")
        out, inp = module.out_features, module.in_features
        if isinstance(shard, Fused):
            parent = name.rpartition(".")[0]
            sections, offset = [], 0
            for source, part in shard.sections:
                sections.append(Section(f"{parent}.{source}" if parent else source, offset, part, None, part.full, inp))
                offset += part.length
        elif isinstance(shard, Shard) and shard.dim == 0:
            sections = [Section(name, 0, shard, None, shard.full, inp)]
        elif isinstance(shard, Shard):
            sections = [Section(name, 0, None, shard, out, shard.full)]
        elif shard is None:
            sections = [Section(name, 0, None, None, out, inp)]
        else:  # a stacked experts weight is no nn.Linear; anything else is not ours to adapt
            continue
        targets[name] = Target(name, inp, out, tuple(sections))
    return targets


@dataclass
class LoraAdapter:
    """One adapter, ready for the slots: per target module, A [k r, in] and scaling * B [out, k r]
    for this rank (float32 on the CPU until a slot takes it)."""

    name: str
    rank: int
    scaling: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]


def content_hash(path: str | Path) -> str:
    """SHA-256 of the adapter's config and weights: a reloaded adapter with other weights under the
    same name hashes differently (the prefix cache keys blocks by it). Raises LoraError."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        try:
            digest.update((path / file).read_bytes())
        except OSError as e:
            raise LoraError(f"LoRA adapter {path}: cannot read {file}: {e.strerror or e}") from None
    return digest.hexdigest()


def read_config(path: Path, max_rank: int) -> tuple[int, float, list[str] | str]:
    """(r, scaling, target_modules) of adapter_config.json. Raises LoraError."""
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except OSError as e:
        raise LoraError(f"LoRA adapter {path}: cannot read {CONFIG_FILE}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise LoraError(f"LoRA adapter {path}: {CONFIG_FILE} is not JSON: {e}") from None
    r = config.get("r")
    if not isinstance(r, int) or r <= 0:
        raise LoraError(f"LoRA adapter {path}: {CONFIG_FILE} needs a positive integer `r`, got {r!r}")
    if r > max_rank:
        raise LoraError(f"LoRA adapter {path}: rank {r} is above --max-lora-rank {max_rank}")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise LoraError(f"LoRA adapter {path}: bias and modules_to_save are not supported")
    alpha = config.get("lora_alpha", r)
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return r, scaling, config.get("target_modules") or []


def _slice(tensor, shard: Shard | None, dim: int) -> torch.Tensor:
    if shard is None:
        return tensor[:]
    parts = []
    for start, length in shard.pieces:
        index = [slice(None), slice(None)]
        index[dim] = slice(start, start + length)
        parts.append(tensor[tuple(index)])
    return torch.cat(parts, dim)


def load_adapter(name: str, path: str | Path, targets: dict[str, Target], max_rank: int,
                 prefix: str = "") -> LoraAdapter:
    """Reads and checks a PEFT adapter directory against the model's targets; `prefix`: the
    model's checkpoint prefix, for adapters saved on a base model without it. Raises LoraError
    for a missing file, a rank above `max_rank`, a target module the model lacks, or a tensor
    of the wrong shape."""
    path = Path(path)
    r, scaling, target_modules = read_config(path, max_rank)
    sections = {s.name: (t, s) for t in targets.values() for s in t.sections}
    if isinstance(target_modules, list):
        leaves = {name.rpartition(".")[2] for name in sections}
        unknown = sorted(set(target_modules) - leaves)
        if unknown:
            raise LoraError(f"LoRA adapter {path}: target modules {unknown} are not linear layers of this "
                            f"model (it has {sorted(leaves)})")
    if not (path / WEIGHTS_FILE).is_file():
        raise LoraError(f"LoRA adapter {path}: {WEIGHTS_FILE} is missing")
    found: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    with safe_open(path / WEIGHTS_FILE, framework="pt") as tensors:
        keys = set(tensors.keys())
        for key in sorted(keys):
            module, _, kind = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
            if kind == "B.weight":
                continue
            if kind != "A.weight" or key.replace(".lora_A.", ".lora_B.") not in keys:
                raise LoraError(f"LoRA adapter {path}: tensor {key} is not one of a lora_A/lora_B pair")
            if module not in sections and prefix + module in sections:
                module = prefix + module
            if module not in sections:
                raise LoraError(f"LoRA adapter {path}: {key} adapts {module}, which is not a linear layer of this model")
            target, section = sections[module]
            a, b = tensors.get_slice(key), tensors.get_slice(key.replace(".lora_A.", ".lora_B."))
            if list(a.get_shape()) != [r, section.in_full] or list(b.get_shape()) != [section.out_full, r]:
                raise LoraError(f"LoRA adapter {path}: {module} has lora_A {a.get_shape()} and lora_B "
                                f"{b.get_shape()}, expected [{r}, {section.in_full}] and [{section.out_full}, {r}]")
            found.setdefault(target.module, {})[section.name] = (
                _slice(a, section.in_shard, 1).float(), _slice(b, section.out_shard, 0).float())
    if not found:
        raise LoraError(f"LoRA adapter {path}: {WEIGHTS_FILE} holds no lora_A/lora_B tensors")
    weights = {module: _stack(targets[module], per_section, r, scaling) for module, per_section in found.items()}
    return LoraAdapter(name, r, scaling, weights)


def _stack(target: Target, per_section: dict, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One target's A [k r, in] and scaling * B [out, k r] over its k adapted sections."""
    present = [s for s in target.sections if s.name in per_section]
    a = torch.cat([per_section[s.name][0] for s in present])
    b = torch.zeros(target.out_features, len(present) * r)
    for j, s in enumerate(present):
        section_b = per_section[s.name][1]
        b[s.offset: s.offset + section_b.shape[0], j * r: (j + 1) * r] = section_b * scaling
    return a, b
