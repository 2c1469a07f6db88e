"""Whether the worker serves its model for generation or for embeddings, and how it pools.

vLLM's rules, read from the same files: `--runner pooling` serves a model for embeddings; with
`--runner auto` (the default) a checkpoint saved by sentence-transformers (a `modules.json` that
lists a `sentence_transformers.models.Pooling` module) is served so, any other as a generator.
The pooling type and normalisation come from, in order: `--pooler-config` (vLLM's JSON,
`{"pooling_type": "LAST"|"MEAN"|"CLS", "normalize": bool}`), the sentence-transformers files (the
Pooling module's `config.json`: `pooling_mode_lasttoken`, `pooling_mode_mean_tokens`,
`pooling_mode_cls_token`; a `Normalize` module), then vLLM's default for a decoder model turned
into an embedding model: last-token pooling, normalised. Matryoshka truncation is allowed where
config.json says `is_matryoshka` or lists `matryoshka_dimensions` (as vLLM reads them).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pagedserve.flags import json_object_flag
from pagedserve.v1 import scheduler_pb2

ST_POOLING = "sentence_transformers.models.Pooling"
ST_NORMALIZE = "sentence_transformers.models.Normalize"
# sentence-transformers modules that only carry the base model (or drop nothing from the output).
ST_NEUTRAL = {"sentence_transformers.models.Transformer", ST_POOLING, ST_NORMALIZE}
POOLING_TYPES = {"LAST": scheduler_pb2.POOLING_TYPE_LAST, "MEAN": scheduler_pb2.POOLING_TYPE_MEAN,
                 "CLS": scheduler_pb2.POOLING_TYPE_CLS}
# The Pooling module's config keys for the modes the worker can compute.
ST_MODES = {"pooling_mode_lasttoken": "LAST", "pooling_mode_mean_tokens": "MEAN",
            "pooling_mode_cls_token": "CLS"}
ST_OTHER_MODES = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                  "pooling_mode_weightedmean_tokens")


class PoolingConfigError(ValueError):
    """The flags or the checkpoint ask for a pooling this worker cannot do."""


@dataclass
class Runner:
    """What WorkerInfo reports: runner "generate" or "pooling", the model's default PoolingParams
    (every field set, for "pooling"), and the matryoshka dimensions it allows."""

    runner: str
    pooler: scheduler_pb2.PoolingParams
    is_matryoshka: bool = False
    matryoshka_dimensions: tuple[int, ...] = ()


def resolve_runner(model_dir: Path, runner: str, pooler_config: str | None, hf_config) -> Runner:
    """`runner`: the --runner flag (auto, generate, pooling); `pooler_config`: --pooler-config's
    JSON or None; `hf_config`: config.json's values. Raises PoolingConfigError naming the flag
    or the file at fault."""
    modules = sentence_transformer_modules(model_dir)
    if runner == "auto":
        runner = "pooling" if any(m.get("type") == ST_POOLING for m in modules) else "generate"
    if runner == "generate":
        if pooler_config:
            raise PoolingConfigError("--pooler-config is given, but the model is served for "
                                     "generation: add --runner pooling")
        return Runner("generate", scheduler_pb2.PoolingParams())
    pooler = scheduler_pb2.PoolingParams(pooling_type=scheduler_pb2.POOLING_TYPE_LAST, normalize=True)
    pooler.MergeFrom(from_sentence_transformers(model_dir, modules))
    pooler.MergeFrom(from_flag(pooler_config))
    dims = tuple(int(d) for d in getattr(hf_config, "matryoshka_dimensions", None) or ())
    matryoshka = bool(dims) or bool(getattr(hf_config, "is_matryoshka", False))
    return Runner("pooling", pooler, matryoshka, dims)


def sentence_transformer_modules(model_dir: Path) -> list[dict]:
    path = model_dir / "modules.json"
    if not path.is_file():
        return []
    modules = json.loads(path.read_text())
    if not isinstance(modules, list):
        raise PoolingConfigError(f"{path}: expected a JSON list of modules")
    return modules


def from_sentence_transformers(model_dir: Path, modules: list[dict]) -> scheduler_pb2.PoolingParams:
    """The pooling the sentence-transformers files declare (fields they say nothing of stay unset)."""
    found = scheduler_pb2.PoolingParams()
    if not modules:
        return found
    other = [m.get("type") for m in modules if m.get("type") not in ST_NEUTRAL]
    if other:  # a Dense layer after pooling, say: ignoring it would return other vectors
        raise PoolingConfigError(f"{model_dir / 'modules.json'}: sentence-transformers module "
                                 f"{other[0]} is not supported (only Transformer, Pooling, Normalize)")
    found.normalize = any(m.get("type") == ST_NORMALIZE for m in modules)
    pooling = next((m for m in modules if m.get("type") == ST_POOLING), None)
    if pooling is None:
        return found
    path = model_dir / pooling.get("path", "") / "config.json"
    if not path.is_file():
        return found
    config = json.loads(path.read_text())
    unsupported = [k for k in ST_OTHER_MODES if config.get(k)]
    if unsupported:
        raise PoolingConfigError(f"{path}: {unsupported[0]} is not supported (LAST, MEAN, CLS are)")
    modes = [mode for key, mode in ST_MODES.items() if config.get(key)]
    if len(modes) > 1:
        raise PoolingConfigError(f"{path}: several pooling modes at once ({', '.join(modes)}) are not supported")
    if modes:
        found.pooling_type = POOLING_TYPES[modes[0]]
    return found


def from_flag(text: str | None) -> scheduler_pb2.PoolingParams:
    """--pooler-config's JSON (vLLM's PoolerConfig keys this worker honours)."""
    found = scheduler_pb2.PoolingParams()
    if not text:
        return found
    try:
        config = json_object_flag(text, "--pooler-config")
    except ValueError as e:
        raise PoolingConfigError(str(e)) from None
    unknown = sorted(set(config) - {"pooling_type", "normalize"})
    if unknown:
        raise PoolingConfigError(f"--pooler-config: {unknown[0]} is not supported "
                                 "(pooling_type and normalize are)")
    if config.get("pooling_type") is not None:
        name = str(config["pooling_type"]).upper()
        if name not in POOLING_TYPES:
            raise PoolingConfigError(f"--pooler-config: pooling_type {config['pooling_type']!r} is not "
                                     f"one of {', '.join(POOLING_TYPES)}")
        found.pooling_type = POOLING_TYPES[name]
    if config.get("normalize") is not None:
        if not isinstance(config["normalize"], bool):
            raise PoolingConfigError("--pooler-config: normalize must be true or false")
        found.normalize = config["normalize"]
    return found
