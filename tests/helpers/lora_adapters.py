"""Tiny random LoRA adapters saved as PEFT saves them, and their reference: the base model with
PEFT's merge applied by hand (W + scaling * B @ A, peft's LoraLayer.get_delta_weight), saved as a
plain transformers directory that hf_reference and a base-model worker can both load."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def lora_modules(hf_model, targets) -> dict[str, nn.Linear]:
    return {name: m for name, m in hf_model.named_modules()
            if isinstance(m, nn.Linear) and name.rpartition(".")[2] in targets}


def save_adapter(hf_model, path: Path, targets=ATTENTION + MLP, r: int = 4, alpha: float = 8, seed: int = 1,
                 use_rslora: bool = False, scale: float = 0.3) -> Path:
    """A PEFT adapter directory for `hf_model` with random A and (non-zero) B on every module named
    in `targets`; `scale` makes its change to greedy tokens visible on a tiny random model."""
    path.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in lora_modules(hf_model, targets).items():
        key = f"base_model.model.{name}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(r, module.in_features, generator=generator) * scale
        tensors[f"{key}.lora_B.weight"] = torch.randn(module.out_features, r, generator=generator) * scale
    save_file(tensors, path / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
              "target_modules": sorted(targets), "use_rslora": use_rslora, "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False, "base_model_name_or_path": "tiny"}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def save_merged(hf_model, adapter: Path, path: Path) -> Path:
    """The base model with the adapter merged into its weights, saved in `path` (with the base's
    tokenizer files, if `hf_model` was saved with one, copied by the caller)."""
    from safetensors.torch import load_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    tensors = load_file(adapter / "adapter_model.safetensors")
    merged = copy.deepcopy(hf_model)
    with torch.no_grad():
        for name, module in lora_modules(merged, config["target_modules"]).items():
            a = tensors[f"base_model.model.{name}.lora_A.weight"]
            b = tensors[f"base_model.model.{name}.lora_B.weight"]
            module.weight += scaling * (b @ a)
    merged.save_pretrained(path)
    return path


def generate(runner, prompts: list[list[int]], adapters: list[tuple[str, Path] | None], max_tokens: int):
    """Greedy completions of `prompts`, prompt i through adapters[i] ((name, directory), or None
    for the base model), prefilled together in one step then decoded together: one mixed batch."""
    from pagedserve.scheduler.validation import with_defaults
    from pagedserve.v1 import scheduler_pb2, worker_pb2
    from tests.helpers.tiny_models import BLOCKS_PER_SEQUENCE

    params = with_defaults(scheduler_pb2.SamplingParams(temperature=0))
    new = []
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters)):
        seq = worker_pb2.NewSequence(seq_id=i, token_ids=prompt, params=params)
        if adapter is not None:
            seq.lora_request.CopyFrom(scheduler_pb2.LoRARequest(lora_name=adapter[0], lora_path=str(adapter[1])))
        new.append(seq)
    scheduled = [worker_pb2.ScheduledSequence(seq_id=i, num_tokens=len(p), new_block_ids=list(
        range(i * BLOCKS_PER_SEQUENCE, (i + 1) * BLOCKS_PER_SEQUENCE))) for i, p in enumerate(prompts)]
    plan = worker_pb2.StepPlan(step_id=1, new_sequences=new, scheduled=scheduled)
    outputs = [[] for _ in prompts]
    for step in range(max_tokens):
        result = runner.execute(plan)
        assert result.error == "", result.error
        for seq_id, token in zip(result.seq_ids, result.token_ids):
            outputs[seq_id].append(token)
        plan = worker_pb2.StepPlan(step_id=step + 2, scheduled=[
            worker_pb2.ScheduledSequence(seq_id=i, num_tokens=1) for i in range(len(prompts))])
    runner.execute(worker_pb2.StepPlan(step_id=max_tokens + 1, freed_seq_ids=range(len(prompts))))
    return outputs


def rank_generate(model_dir, prompts, adapters, max_tokens: int):
    """One tensor parallel rank's generate (run by distributed.run_local_ranks)."""
    from pagedserve.worker import distributed
    from pagedserve.worker.model_runner import ModelRunner
    from tests.helpers.tiny_models import runner_config

    config = runner_config(model_dir, rank=distributed.rank(), world_size=distributed.world_size(),
                           enable_lora=True, max_loras=2)
    return generate(ModelRunner(config), prompts, adapters, max_tokens)
