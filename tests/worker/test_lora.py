"""LoRA adapters in the worker, judged against transformers with the adapter merged into the
weights (W + scaling * B @ A): greedy tokens identical, for attention and MLP projections (the
fused q/k/v and gate/up linears adapted section by section), in mixed batches of the base model
and several adapters; bad adapters refused at load with the reason."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedserve.worker.lora import LoraError, load_adapter
from pagedserve.worker.model_runner import ModelRunner
from tests.helpers import hf_reference, lora_adapters, tiny_models
from tests.helpers.lora_adapters import ATTENTION, MLP
from tests.helpers.tiny_models import PROMPTS, runner_config

MAX_TOKENS = 6


def served(tmp_path, architecture, **adapter_kwargs):
    """(base dir, adapter dir, merged reference dir) of a tiny model and one adapter."""
    hf = tiny_models.build(architecture, tmp_path / "base")
    adapter = lora_adapters.save_adapter(hf, tmp_path / "adapter", **adapter_kwargs)
    merged = lora_adapters.save_merged(hf, adapter, tmp_path / "merged")
    return tmp_path / "base", adapter, merged


@pytest.mark.parametrize("architecture, adapter_kwargs", [
    ("llama", {}),
    ("qwen3", {"use_rslora": True, "r": 8}),  # scaling alpha / sqrt(r)
    ("qwen2", {"targets": ("q_proj", "v_proj")}),  # two of the fused q/k/v sections, biases kept
    ("mistral", {"targets": ("k_proj", "gate_proj")}),
    ("opt", {"targets": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")}),
    ("phi3", {"targets": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")}),  # fused in the checkpoint
])
def test_greedy_with_adapter_matches_merged_weights(tmp_path, architecture, adapter_kwargs):
    base, adapter, merged = served(tmp_path, architecture, **adapter_kwargs)
    runner = ModelRunner(runner_config(base, enable_lora=True))
    outputs = lora_adapters.generate(runner, PROMPTS, [("a", adapter)] * len(PROMPTS), MAX_TOKENS)
    expected = [hf_reference.greedy(merged, p, MAX_TOKENS, ignore_eos=True) for p in PROMPTS]
    assert outputs == expected
    base_outputs = [hf_reference.greedy(base, p, MAX_TOKENS, ignore_eos=True) for p in PROMPTS]
    assert outputs != base_outputs  # the adapter changes what the model says


def test_mixed_batch_of_base_and_two_adapters_matches_each_alone(tmp_path):
    hf = tiny_models.build("llama", tmp_path / "base")
    one = lora_adapters.save_adapter(hf, tmp_path / "one", targets=ATTENTION, seed=1)
    two = lora_adapters.save_adapter(hf, tmp_path / "two", targets=MLP, seed=2, r=2)
    runner = ModelRunner(runner_config(tmp_path / "base", enable_lora=True, max_loras=2))
    mix = [None, ("one", one), ("two", two), ("one", one)]
    together = lora_adapters.generate(runner, PROMPTS, mix, MAX_TOKENS)
    alone = [lora_adapters.generate(runner, [p], [a], MAX_TOKENS)[0] for p, a in zip(PROMPTS, mix)]
    assert together == alone
    merged = {None: tmp_path / "base", "one": lora_adapters.save_merged(hf, one, tmp_path / "m1"),
              "two": lora_adapters.save_merged(hf, two, tmp_path / "m2")}
    assert together == [hf_reference.greedy(merged[a and a[0]], p, MAX_TOKENS, ignore_eos=True)
                        for p, a in zip(PROMPTS, mix)]
    assert len({tuple(t) for t in together[1:3]}) == 2


def test_more_adapters_than_slots_are_swapped_between_steps(tmp_path):
    hf = tiny_models.build("llama", tmp_path / "base")
    adapters = [("a%d" % i, lora_adapters.save_adapter(hf, tmp_path / f"a{i}", seed=i)) for i in range(3)]
    runner = ModelRunner(runner_config(tmp_path / "base", enable_lora=True, max_loras=1, max_cpu_loras=2))
    first = [lora_adapters.generate(runner, PROMPTS[1:2], [a], 3)[0] for a in adapters]
    again = [lora_adapters.generate(runner, PROMPTS[1:2], [a], 3)[0] for a in reversed(adapters)]
    assert first == again[::-1] and len({tuple(t) for t in first}) == 3


@pytest.fixture(scope="module")
def llama_targets(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    hf = tiny_models.build("llama", path)
    return hf, ModelRunner(runner_config(path, enable_lora=True)).lora.targets


def _broken(path, hf, edit_config=None, edit_tensors=None):
    lora_adapters.save_adapter(hf, path)
    if edit_config:
        config = json.loads((path / "adapter_config.json").read_text())
        edit_config(config)
        (path / "adapter_config.json").write_text(json.dumps(config))
    if edit_tensors:
        tensors = load_file(path / "adapter_model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, path / "adapter_model.safetensors")
    return path


def _rename(tensors, old, new):
    for key in [k for k in tensors if old in k]:
        tensors[key.replace(old, new)] = tensors.pop(key)


@pytest.mark.parametrize("edit_config, edit_tensors, message", [
    (lambda c: c.update(r=32), None, "rank 32 is above --max-lora-rank 16"),
    (lambda c: c.update(target_modules=["q_proj", "qkv_weird"]), None, "['qkv_weird'] are not linear layers"),
    (None, lambda t: _rename(t, "layers.0.self_attn.q_proj", "layers.0.self_attn.nope"), "which is not a linear layer"),
    (None, lambda t: t.update({k: v[:, :-1].contiguous() for k, v in t.items() if "lora_A" in k}), "has lora_A [4, 127]"),
    (None, lambda t: t.pop(next(k for k in list(t) if "lora_B" in k)), "not one of a lora_A/lora_B pair"),
])
def test_bad_adapters_are_refused_with_the_reason(tmp_path, llama_targets, edit_config, edit_tensors, message):
    hf, targets = llama_targets
    path = _broken(tmp_path, hf, edit_config, edit_tensors)
    with pytest.raises(LoraError, match=".*" + message.replace("[", r"\[").replace("]", r"\]")):
        load_adapter("bad", path, targets, 16, "model.")


def test_missing_files_are_named(tmp_path, llama_targets):
    hf, targets = llama_targets
    with pytest.raises(LoraError, match="cannot read adapter_config.json"):
        load_adapter("none", tmp_path / "nowhere", targets, 16)
    path = lora_adapters.save_adapter(hf, tmp_path / "a")
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(LoraError, match="adapter_model.safetensors is missing"):
        load_adapter("a", path, targets, 16)


def test_fused_linears_are_targets_section_by_section(llama_targets):
    _, targets = llama_targets
    qkv = targets["model.layers.0.self_attn.qkv_proj"]
    assert [(s.name.rpartition(".")[2], s.offset) for s in qkv.sections] == [("q_proj", 0), ("k_proj", 64), ("v_proj", 80)]
    assert "lm_head" not in targets and targets["model.layers.1.mlp.down_proj"].sections[0].in_shard is not None
