"""The router's LoRA registry: --lora-modules in both of vLLM's spellings, adapters checked
against the base checkpoint's safetensors headers before anything is sent, and a bad adapter at
start-up a SystemExit naming the flag."""
import json
from types import SimpleNamespace

import pytest

from pagedserve.router.lora import LoraLoadError, LoraRegistry, lora_registry, parse_lora_module
from tests.helpers import lora_adapters, tiny_models


def test_lora_modules_spellings():
    assert parse_lora_module("sql=/a/b") == ("sql", "/a/b", None)
    assert parse_lora_module('{"name": "sql", "path": "/a", "base_model_name": "m"}') == ("sql", "/a", "m")
    for bad in ("sql", "=/a", '{"name": "sql"}', "{not json"):
        with pytest.raises(ValueError, match="--lora-modules"):
            parse_lora_module(bad)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    return path, tiny_models.build("qwen3", path)


def settings(*modules, enable=True):
    return SimpleNamespace(enable_lora=enable, lora_modules=list(modules), max_lora_rank=8)


def test_adapters_are_checked_against_the_base_checkpoint(base, tmp_path):
    path, hf = base
    registry = LoraRegistry(path, "base", 8)
    good = lora_adapters.save_adapter(hf, tmp_path / "good")
    adapter = registry.add("good", str(good))
    assert registry.get("good") is adapter and len(adapter.content_hash) == 64
    with pytest.raises(LoraLoadError, match="already been loaded"):
        registry.add("good", str(good))
    wide = lora_adapters.save_adapter(hf, tmp_path / "wide", r=16)
    with pytest.raises(LoraLoadError, match="rank 16 is above --max-lora-rank 8"):
        registry.add("wide", str(wide))
    config = json.loads((good / "adapter_config.json").read_text())
    (good / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj", "c_attn"]}))
    with pytest.raises(LoraLoadError, match=r"\['c_attn'\] are not linear layers"):
        registry.add("renamed", str(good))
    assert set(registry.adapters) == {"good"}


def test_startup_errors_name_the_flag(base, tmp_path):
    path, hf = base
    good = lora_adapters.save_adapter(hf, tmp_path / "good")
    registry = lora_registry(settings(f"good={good}", json.dumps({"name": "again", "path": str(good)})), path, "base")
    assert set(registry.adapters) == {"good", "again"}
    with pytest.raises(SystemExit, match="--lora-modules: LoRA adapter .*nowhere: adapter_config.json is missing"):
        lora_registry(settings(f"bad={tmp_path / 'nowhere'}"), path, "base")
    with pytest.raises(SystemExit, match="--lora-modules needs --enable-lora"):
        lora_registry(settings(f"good={good}", enable=False), path, "base")
    assert lora_registry(settings(enable=False), path, "base") is None
