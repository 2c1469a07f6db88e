"""The LoRA adapters the router serves, by name (vLLM's interface): from --lora-modules at start-up,
and loaded or unloaded at run time through POST /v1/load_lora_adapter and /v1/unload_lora_adapter
where VLLM_ALLOW_RUNTIME_LORA_UPDATING (or PAGEDSERVE_ALLOW_RUNTIME_LORA_UPDATING) is true.

A request's `model` names an adapter; the router sends its path and content hash with the request
(GenerateRequest.lora_request) and each worker reads the directory on first use. So an adapter is
checked here, before anything is sent: its PEFT files (adapter_config.json, adapter_model.safetensors),
its rank against --max-lora-rank, and each lora_A/lora_B pair against the shape of the base
checkpoint's weight it adapts (read from the safetensors headers, no tensor loaded).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from pagedserve.v1 import scheduler_pb2 as pb

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
RUNTIME_UPDATING_ENV = ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "PAGEDSERVE_ALLOW_RUNTIME_LORA_UPDATING")


class LoraLoadError(ValueError):
    """An adapter that cannot be served; the message names the file and the reason."""


@dataclass(frozen=True)
class LoraAdapter:
    name: str
    path: str
    base_model_name: str | None
    content_hash: str  # SHA-256 of its two files (hex)
    created: int

    def request(self) -> pb.LoRARequest:
        return pb.LoRARequest(lora_name=self.name, lora_path=self.path, content_hash=self.content_hash)


def runtime_updating_allowed() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true") for name in RUNTIME_UPDATING_ENV)


def parse_lora_module(text: str) -> tuple[str, str, str | None]:
    """(name, path, base_model_name) of one --lora-modules value: `name=path` or vLLM's JSON
    object. Raises ValueError naming the value."""
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--lora-modules {text!r}: not JSON: {e}") from None
        if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not isinstance(value.get("path"), str):
            raise ValueError(f"--lora-modules {text!r}: the JSON form needs string 'name' and 'path'")
        return value["name"], value["path"], value.get("base_model_name")
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--lora-modules {text!r}: expected name=path or a JSON object")
    return name, path, None


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a .safetensors file's header (its first 8 bytes give the JSON
    header's length; format: huggingface/safetensors). Raises OSError, ValueError."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > 100 << 20:
            raise ValueError("header too large")
        header = json.loads(f.read(length))
    return {name: value["shape"] for name, value in header.items() if name != "__metadata__"}


def base_linear_shapes(model_dir: str | Path) -> dict[str, list[int]]:
    """Module name -> [out, in] of every 2-D `.weight` in the base checkpoint's safetensors files
    (empty where it has none: then only the worker checks shapes)."""
    shapes = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        try:
            for name, shape in safetensors_shapes(file).items():
                if name.endswith(".weight") and len(shape) == 2:
                    shapes[name.removesuffix(".weight")] = shape
        except (OSError, ValueError):
            continue
    return shapes


class LoraRegistry:
    def __init__(self, model_dir: str | Path, base_model_name: str, max_rank: int):
        self.base_model_name, self.max_rank = base_model_name, max_rank
        self.linears = base_linear_shapes(model_dir)
        self.adapters: dict[str, LoraAdapter] = {}

    def get(self, name: str | None) -> LoraAdapter | None:
        return self.adapters.get(name) if name is not None else None

    def add(self, name: str, path: str, base_model_name: str | None = None) -> LoraAdapter:
        """Checks and registers an adapter. Raises LoraLoadError (a name already served, a bad adapter)."""
        if name in self.adapters or name == self.base_model_name:
            raise LoraLoadError(f"The lora adapter '{name}' has already been loaded.")
        if base_model_name not in (None, self.base_model_name):
            raise LoraLoadError(f"LoRA adapter {name}: base_model_name {base_model_name!r} is not the "
                                f"served model {self.base_model_name!r}")
        content_hash = self.check(Path(path))
        adapter = LoraAdapter(name, str(Path(path).resolve()), base_model_name, content_hash, int(time.time()))
        self.adapters[name] = adapter
        return adapter

    def remove(self, name: str) -> LoraAdapter | None:
        return self.adapters.pop(name, None)

    def check(self, path: Path) -> str:
        """The adapter's content hash, once its files pass the checks. Raises LoraLoadError."""
        where = f"LoRA adapter {path}"
        for file in (CONFIG_FILE, WEIGHTS_FILE):
            if not (path / file).is_file():
                raise LoraLoadError(f"{where}: {file} is missing")
        try:
            config = json.loads((path / CONFIG_FILE).read_text())
            tensors = safetensors_shapes(path / WEIGHTS_FILE)
        except (OSError, ValueError, struct.error) as e:
            raise LoraLoadError(f"{where}: cannot read it: {e}") from None
        r = config.get("r") if isinstance(config, dict) else None
        if not isinstance(r, int) or r <= 0:
            raise LoraLoadError(f"{where}: {CONFIG_FILE} needs a positive integer `r`, got {r!r}")
        if r > self.max_rank:
            raise LoraLoadError(f"{where}: rank {r} is above --max-lora-rank {self.max_rank}")
        if config.get("bias", "none") != "none" or config.get("modules_to_save"):
            raise LoraLoadError(f"{where}: bias and modules_to_save are not supported")
        self.check_targets(where, config.get("target_modules"))
        self.check_tensors(where, tensors, r)
        digest = hashlib.sha256()
        for file in (CONFIG_FILE, WEIGHTS_FILE):
            digest.update((path / file).read_bytes())
        return digest.hexdigest()

    def check_targets(self, where: str, targets) -> None:
        if not self.linears or not isinstance(targets, list):
            return
        leaves = {name.rpartition(".")[2] for name in self.linears}
        unknown = sorted(set(targets) - leaves)
        if unknown:
            raise LoraLoadError(f"{where}: target modules {unknown} are not linear layers of the base model")

    def check_tensors(self, where: str, tensors: dict[str, list[int]], r: int) -> None:
        pairs = 0
        for key, shape in sorted(tensors.items()):
            module, _, kind = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
            partner = key.replace(".lora_A.", ".lora_B.") if kind == "A.weight" else key.replace(".lora_B.", ".lora_A.")
            if kind not in ("A.weight", "B.weight") or partner not in tensors:
                raise LoraLoadError(f"{where}: tensor {key} is not one of a lora_A/lora_B pair")
            if kind == "B.weight":
                continue
            pairs += 1
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            if self.linears:
                base = self.linears.get(module) or self.linears.get("model." + module)
                if base is None:
                    raise LoraLoadError(f"{where}: {key} adapts {module}, which is not a linear layer of the base model")
                expected_a, expected_b = [r, base[1]], [base[0], r]
            else:
                expected_a, expected_b = [r, shape[-1]], [b[0], r]
            if shape != expected_a or b != expected_b:
                raise LoraLoadError(f"{where}: {module} has lora_A {shape} and lora_B {b}, expected "
                                    f"{expected_a} and {expected_b}")
        if not pairs:
            raise LoraLoadError(f"{where}: {WEIGHTS_FILE} holds no lora_A/lora_B tensors")



def lora_registry(settings, model_dir: str, base_model_name: str) -> LoraRegistry | None:
    """The registry of --enable-lora with the --lora-modules adapters in it; None without LoRA.
    Raises SystemExit naming the flag and the adapter where one cannot be served."""
    if not settings.enable_lora:
        if settings.lora_modules:
            raise SystemExit("--lora-modules needs --enable-lora")
        return None
    registry = LoraRegistry(model_dir, base_model_name, settings.max_lora_rank)
    for value in settings.lora_modules or []:
        try:
            registry.add(*parse_lora_module(value))
        except (ValueError, LoraLoadError) as e:
            raise SystemExit(f"--lora-modules: {e}") from None
    return registry
