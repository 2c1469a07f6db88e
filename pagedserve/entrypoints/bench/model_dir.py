"""A model directory of another shape, built from a real one: its config.json with some fields
overridden (vLLM's `--hf-overrides`) and its tokenizer and generation files, but no weights, so it
is served or profiled with `--load-format dummy`. The "no-op model" of the host benchmark is one:
a forward pass that costs almost nothing, so what a step costs is the serving stack's own work."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from pagedserve.flags import json_object_flag

# One layer of a Llama with SmolLM2's tokenizer and vocabulary (49,152): 2 query heads and 1 KV
# head of 64, hidden 128, intermediate 256.
NOOP_OVERRIDES = {"num_hidden_layers": 1, "hidden_size": 128, "num_attention_heads": 2,
                  "num_key_value_heads": 1, "head_dim": 64, "intermediate_size": 256}
# Weights and their indexes: what the new shape makes useless.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")


def parse_overrides(text: str | None) -> dict:
    """`--hf-overrides` as vLLM takes it: a JSON object of config.json fields. Raises ValueError
    on anything else."""
    return json_object_flag(text, "--hf-overrides") if text else {}


def build_model_dir(source: str | Path, dest: str | Path, overrides: dict) -> Path:
    """Writes into `dest` (created) `source`'s files minus its weights, with `overrides` applied
    to config.json (e.g. {"num_hidden_layers": 1, "vocab_size": 150000}). Returns `dest`. Raises
    FileNotFoundError when `source` has no config.json."""
    source, dest = Path(source), Path(dest)
    config = json.loads((source / "config.json").read_text())
    dest.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if (path.is_file() and path.name != "config.json" and not path.name.startswith(".")
                and not path.name.endswith(WEIGHT_SUFFIXES)):
            shutil.copy2(path, dest / path.name)
    (dest / "config.json").write_text(json.dumps(config | overrides, indent=2))
    return dest
