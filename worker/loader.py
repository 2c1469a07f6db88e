"""Loading a Hugging Face model directory as it is: config.json, model.safetensors (or shards
named by model.safetensors.index.json), generation_config.json for the EOS ids.

The model is built on the meta device (no time spent on random init), moved to its device
uninitialised, then every parameter is copied from the checkpoint tensor of the same name.
"""
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from worker.models import model_class
from worker.models.layers import RotaryEmbedding

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LoadError(RuntimeError):
    """The model directory cannot be served as it is; the message names the file."""


@dataclass
class LoadedModel:
    model: nn.Module
    hf_config: SimpleNamespace
    architecture: str
    dtype: torch.dtype
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LoadError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise LoadError(f"{path}: not valid JSON ({e})") from None


def resolve_dtype(name: str, hf_config, device: torch.device) -> torch.dtype:
    if name != "auto":
        if name not in DTYPES:
            raise LoadError(f"--dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
        return DTYPES[name]
    if device.type == "cpu":
        return torch.float32  # CPUs are slow at half precision matmuls without AMX
    saved = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None) or "bfloat16"
    return DTYPES.get(saved, torch.bfloat16)


def eos_token_ids(model_dir: Path, hf_config) -> list[int]:
    """generation_config.json's EOS ids first (chat models list their end-of-turn token there),
    then config.json's, without duplicates."""
    sources = [getattr(hf_config, "eos_token_id", None)]
    generation_config = model_dir / "generation_config.json"
    if generation_config.exists():
        sources.insert(0, read_json(generation_config).get("eos_token_id"))
    ids = []
    for value in sources:
        for token in value if isinstance(value, list) else [value]:
            if token is not None and token not in ids:
                ids.append(token)
    return ids


def checkpoint_files(model_dir: Path) -> dict[Path, list[str]]:
    """Each safetensors file with the names of the tensors to read from it."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files: dict[Path, list[str]] = {}
        for name, file in read_json(index)["weight_map"].items():
            files.setdefault(model_dir / file, []).append(name)
        return files
    single = model_dir / "model.safetensors"
    if single.exists():
        with open_checkpoint(single) as f:
            return {single: list(f.keys())}
    raise LoadError(f"{model_dir}: neither model.safetensors nor model.safetensors.index.json (only safetensors checkpoints load)")


def open_checkpoint(path: Path):
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise LoadError(f"{path}: not a readable safetensors file ({e})") from None


def load_weights(model: nn.Module, model_dir: Path) -> None:
    params = dict(model.named_parameters())  # a tied lm_head appears once, as the embedding
    files = checkpoint_files(model_dir)
    loaded, unexpected = set(), []
    with tqdm(desc="loading weights", unit="tensor", total=sum(map(len, files.values()))) as bar:
        for path, names in files.items():
            if not path.exists():
                raise LoadError(f"{path}: no such file (named by model.safetensors.index.json)")
            with open_checkpoint(path) as f:
                for name in names:
                    bar.update()
                    param = params.get(name)
                    if param is None:
                        unexpected.append(name)
                        continue
                    tensor = f.get_tensor(name)
                    if tensor.shape != param.shape:
                        raise LoadError(
                            f"{path}: tensor {name} has shape {list(tensor.shape)}, the model built from "
                            f"config.json expects {list(param.shape)}"
                        )
                    load_weight(param, tensor)
                    loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise LoadError(f"{model_dir}: the checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}")
    if unexpected:
        log.warning("ignored %d checkpoint tensors the model does not use, e.g. %s", len(unexpected), unexpected[:3])


def load_weight(param: nn.Parameter, tensor: torch.Tensor) -> None:
    """The one place a checkpoint tensor meets its parameter (tensor parallelism will slice here)."""
    param.data.copy_(tensor)


def dummy_weights(model: nn.Module, seed: int) -> None:
    # Small values keep activations finite through many layers; the numbers mean nothing.
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.data.copy_(torch.rand(param.shape, generator=generator) * 2e-3 - 1e-3)


def load_model(config, backend) -> LoadedModel:
    """Build and fill the model that config.model names. `config` is a WorkerConfig."""
    model_dir = Path(config.model)
    if not model_dir.is_dir():
        raise LoadError(f"{model_dir}: not a directory (pass --model a Hugging Face model directory)")
    hf_config = SimpleNamespace(**read_json(model_dir / "config.json"))
    architectures = getattr(hf_config, "architectures", None) or []
    if not architectures:
        raise LoadError(f"{model_dir / 'config.json'}: no `architectures` entry, so the model class is unknown")
    try:
        cls = model_class(architectures[0])
    except ValueError as e:
        raise LoadError(f"{model_dir / 'config.json'}: {e}") from None

    device = torch.device(config.device)
    dtype = resolve_dtype(config.dtype, hf_config, device)
    max_position = getattr(hf_config, "max_position_embeddings", None)
    max_model_len = config.max_model_len or max_position
    if not max_model_len:
        raise LoadError(f"{model_dir / 'config.json'}: no max_position_embeddings; pass --max-model-len")
    if max_position and max_model_len > max_position:
        log.warning("--max-model-len %d exceeds the model's max_position_embeddings %d", max_model_len, max_position)

    with torch.device("meta"):
        model = cls(hf_config, backend, max_model_len)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()
    if config.load_format == "dummy":
        dummy_weights(model, config.seed)
    elif config.load_format == "auto":
        load_weights(model, model_dir)
    else:
        raise LoadError(f"--load-format {config.load_format!r} is not one of auto, dummy")
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.build(device)
    model.eval()
    return LoadedModel(
        model=model,
        hf_config=hf_config,
        architecture=architectures[0],
        dtype=dtype,
        max_model_len=max_model_len,
        vocab_size=hf_config.vocab_size,
        eos_token_ids=eos_token_ids(model_dir, hf_config),
    )
