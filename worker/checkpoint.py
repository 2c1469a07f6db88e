"""The tensors of a Hugging Face checkpoint, read lazily: each tensor's shape without its data, and
any slice of it without the rest, which is what a tensor parallel rank reads.

Formats, in the order they are looked for: model.safetensors.index.json (shards), model.safetensors,
pytorch_model.bin.index.json (shards), pytorch_model.bin. Safetensors slices come from the file's
memory map; .bin files are unpickled with weights_only=True (no code runs) and memory-mapped where
their format allows, so a slice reads only its own pages there too.
"""
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")


class LoadError(RuntimeError):
    """The model directory cannot be served as it is; the message names the file."""


@dataclass
class LazyTensor:
    shape: list[int]
    read: Callable[[tuple], torch.Tensor]  # index (a tuple of slices) -> that part of the tensor


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LoadError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise LoadError(f"{path}: not valid JSON ({e})") from None


def weight_files(model_dir: Path) -> dict[Path, list[str] | None]:
    """Each weight file with the names of the tensors to read from it (None: all of them)."""
    for name in WEIGHT_FILES:
        path = model_dir / name
        if not path.exists():
            continue
        if not name.endswith(".index.json"):
            return {path: None}
        files: dict[Path, list[str]] = {}
        for tensor, file in read_json(path).get("weight_map", {}).items():
            files.setdefault(model_dir / file, []).append(tensor)
        for file in files:
            if not file.exists():
                raise LoadError(f"{file}: no such file (named by {path.name})")
        return files
    raise LoadError(f"{model_dir}: neither model.safetensors nor pytorch_model.bin (nor their .index.json shards)")


@contextmanager
def open_weights(path: Path) -> Iterator[dict[str, LazyTensor]]:
    """The file's tensors by name, readable while the context is open."""
    if path.suffix == ".safetensors":
        with _open_safetensors(path) as f:
            yield {name: _safetensors_tensor(f, name) for name in f.keys()}
    else:
        tensors = _load_bin(path)
        yield {name: LazyTensor(list(t.shape), t.__getitem__) for name, t in tensors.items()}


def _open_safetensors(path: Path):
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise LoadError(f"{path}: not a readable safetensors file ({e})") from None


def _safetensors_tensor(f, name: str) -> LazyTensor:
    view = f.get_slice(name)
    return LazyTensor(list(view.get_shape()), view.__getitem__)


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            tensors = torch.load(path, map_location="cpu", weights_only=True)  # the legacy (pre-zip) format
    except Exception as e:  # unpickling errors come in many types
        raise LoadError(f"{path}: not a loadable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(tensors, dict):
        raise LoadError(f"{path}: holds a {type(tensors).__name__}, not a state dict of tensors")
    return {name: t for name, t in tensors.items() if isinstance(t, torch.Tensor)}
