"""Loading a Hugging Face model directory as it is: config.json, the weights (see checkpoint.py),
generation_config.json (EOS ids, default sampling parameters).

The model is built on the meta device at this rank's size (no time spent on random init), moved
to its device uninitialised, then every parameter is filled from the checkpoint tensor of the
same name (a fused projection's sections from the tensors they name: q, k and v into one qkv
weight, so a serving model has one layout): only the slice this rank holds under tensor
parallelism (see models/sharding.py), so no rank ever reads the whole model. `--load-format
dummy` fills the same slices from random tensors of the checkpoint's shapes instead, without
reading a weight file.
"""
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from tqdm import tqdm

from pagedserve.v1 import scheduler_pb2
from pagedserve.worker import distributed
from pagedserve.worker import gguf_checkpoint
from pagedserve.worker.checkpoint import LazyTensor, LoadError, open_weights, read_json, weight_files
from pagedserve.worker.models import model_class
from pagedserve.worker.models.layers import RotaryEmbedding
from pagedserve.worker.models.sharding import Experts, Fused, Shard
from pagedserve.worker.pooling_config import resolve_runner

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# generation_config.json keys that become a request's defaults when it does not set them (vLLM's set).
SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")

@dataclass
class ModelSpec:
    """What config.json says, checked before anything is loaded."""
    model_dir: Path
    hf_config: SimpleNamespace
    architecture: str
    model_class: type


@dataclass
class LoadedModel:
    model: nn.Module
    hf_config: SimpleNamespace
    architecture: str
    dtype: torch.dtype
    max_model_len: int
    sliding_window: int | None  # the window of every layer, else None (CausalLM.kv_sliding_window)
    vocab_size: int
    eos_token_ids: list[int]
    sampling_defaults: scheduler_pb2.SamplingParams


def inspect_model_dir(config) -> ModelSpec:
    """config.json's architecture and the weight files, checked in milliseconds (the worker does
    this before it opens any port). `config` is a WorkerConfig."""
    model_dir = Path(config.model)
    if gguf_checkpoint.is_gguf(model_dir):
        return gguf_spec(config, model_dir)
    if not model_dir.is_dir():
        raise LoadError(f"{model_dir}: not a directory (pass --model a Hugging Face model directory)")
    config_path = model_dir / "config.json"
    raw = read_json(config_path)
    architectures = raw.get("architectures") or []
    if not architectures:
        raise LoadError(f"{config_path}: no `architectures` entry, so the model class is unknown")
    try:
        cls = model_class(architectures[0])
    except ValueError as e:
        raise LoadError(f"{config_path}: {e}") from None
    if config.load_format == "auto":
        weight_files(model_dir)
    elif config.load_format != "dummy":
        raise LoadError(f"--load-format {config.load_format!r} is not one of auto, dummy")
    return ModelSpec(model_dir, model_config(raw, cls), architectures[0], cls)


def gguf_spec(config, path: Path) -> ModelSpec:
    """A GGUF file's spec: its config from the file's metadata (gguf_checkpoint.gguf_config)."""
    if config.world_size != 1:
        raise LoadError(f"{path}: GGUF files are served without tensor parallelism (--world-size 1)")
    if config.load_format != "auto" or getattr(config, "quantization", None):
        raise LoadError(f"{path}: --load-format and --quantization do not apply to a GGUF file "
                        "(its own quantization is served)")
    raw = gguf_checkpoint.gguf_config(path)
    cls = model_class(raw["architectures"][0])
    return ModelSpec(path, model_config(raw, cls), raw["architectures"][0], cls)


def tokenizer_dir(config) -> Path:
    """Where the tokenizer, chat template and generation_config.json are: --tokenizer, else the
    model directory (a GGUF file's own directory holds none of them)."""
    return Path(config.tokenizer or config.model)


def model_config(raw: dict, cls) -> SimpleNamespace:
    """config.json with the architecture's defaults under it and its own key names aliased to the
    standard ones (GPT-2's n_embd is hidden_size), as transformers' config classes do."""
    values = {**cls.config_defaults, **raw}
    for standard, own in cls.config_aliases.items():
        if own in values:
            values.setdefault(standard, values[own])
    return SimpleNamespace(**values)


def resolve_dtype(name: str, hf_config, device: torch.device, quantized: bool = False) -> torch.dtype:
    """--dtype. auto: on CUDA the checkpoint's dtype; on the CPU bfloat16 when the checkpoint is
    bfloat16 or float16 and the CPU has AVX-512 BF16 or AMX (cpu/features.py; there oneDNN's
    bfloat16 linears ran 2.6-5x float32's from 8 rows up, 1.06-1.28x at one row,
    docs/performance/cpu-quantized.md), else float32:
    a float32 checkpoint is served as it was saved, and a CPU without those units is slow at
    half precision. `quantized` (--quantization, whose ops take float32 models) keeps float32."""
    if name != "auto":
        if name not in DTYPES:
            raise LoadError(f"--dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
        return DTYPES[name]
    saved = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
    if device.type == "cpu":
        from pagedserve.worker.cpu.features import has_native_bf16

        half = saved in ("bfloat16", "float16")
        return torch.bfloat16 if half and not quantized and has_native_bf16() else torch.float32
    return DTYPES.get(saved or "bfloat16", torch.bfloat16)


def generation_config(model_dir: Path) -> dict:
    path = model_dir / "generation_config.json"
    return read_json(path) if path.is_file() else {}


def eos_token_ids(model_dir: Path, hf_config) -> list[int]:
    """generation_config.json's EOS ids first (chat models list their end-of-turn token there),
    then config.json's, without duplicates."""
    sources = [generation_config(model_dir).get("eos_token_id"), getattr(hf_config, "eos_token_id", None)]
    ids = []
    for value in sources:
        for token in value if isinstance(value, list) else [value]:
            if token is not None and token not in ids:
                ids.append(token)
    return ids


def sampling_defaults(model_dir: Path) -> scheduler_pb2.SamplingParams:
    """The sampling parameters the model's authors recommend, for requests that leave them unset:
    reported in WorkerInfo, applied by the scheduler (scheduler/validation.py), which checks them."""
    generation = generation_config(model_dir)
    values = {key: generation[key] for key in SAMPLING_DEFAULTS if generation.get(key) is not None}
    try:
        return scheduler_pb2.SamplingParams(**values)
    except (TypeError, ValueError) as e:  # a string or a fractional top_k
        raise LoadError(f"{model_dir / 'generation_config.json'}: {e}") from None


# ----- weights ---------------------------------------------------------------------------------


def checkpoint_table(model: nn.Module) -> dict[str, tuple[torch.Tensor, Shard | None]]:
    """Where each checkpoint tensor the model reads goes, by the tensor's name: the data of the
    parameter it fills (a tied LM head appears once, as the embedding), or of its section of a
    fused one, with the Shard of it this rank holds."""
    shards = {}
    for module_name, module in model.named_modules():
        for param_name, shard in getattr(module, "tp_shards", {}).items():
            shards[f"{module_name}.{param_name}" if module_name else param_name] = shard
    table = {}
    for name, param in model.named_parameters():
        shard = shards.get(name)
        if isinstance(shard, Fused):
            table.update(fused_sections(name, param, shard))
        elif isinstance(shard, Experts):
            table.update(expert_sections(name, param, shard))
        else:
            table[name] = (param.data, shard)
    return table


def fused_sections(name: str, param: nn.Parameter, fused: Fused) -> dict[str, tuple[torch.Tensor, Shard]]:
    """A fused parameter's sections by the checkpoint tensor each holds: "a.qkv_proj.weight" holds
    "a.q_proj.weight", "a.k_proj.weight" and "a.v_proj.weight", one after the other along dim 0."""
    module_name, _, param_name = name.rpartition(".")
    parent = module_name.rpartition(".")[0]
    sections, offset = {}, 0
    for source, shard in fused.sections:
        sections[f"{parent}.{source}.{param_name}" if parent else f"{source}.{param_name}"] = (
            param.data.narrow(0, offset, shard.length), shard)
        offset += shard.length
    return sections


def expert_sections(name: str, param: nn.Parameter, experts: Experts) -> dict[str, tuple[torch.Tensor, Shard]]:
    """A stacked experts parameter's regions by checkpoint tensor: "a.experts.gate_up_proj" [E, 2I, H]
    holds "a.experts.<e>.gate_proj.weight" then "...up_proj.weight" in row e; a single source fills
    the whole row ("a.experts.<e>.down_proj.weight" into down_proj[e])."""
    module_name = name.rpartition(".")[0]
    sections = {}
    for e in range(experts.num_experts):
        offset = 0
        for source, shard in experts.sections:
            region = param.data[e]
            if len(experts.sections) > 1:
                region = region.narrow(0, offset, shard.length)
                offset += shard.length
            sections[f"{module_name}.{e}.{source}.weight"] = (region, shard)
    return sections


def checkpoint_shape(region: torch.Tensor, shard: Shard | None) -> list[int]:
    shape = list(region.shape)
    if shard is not None:
        shape[shard.dim] = shard.full
        if shard.transposed:
            shape.reverse()
    return shape


def read_slice(tensor: LazyTensor, shard: Shard | None) -> torch.Tensor | None:
    """This rank's part of a checkpoint tensor, in the parameter's layout (None: no part)."""
    if shard is None:
        return tensor.read((slice(None),))
    dim = 1 - shard.dim if shard.transposed else shard.dim
    parts = []
    for start, length in shard.pieces:
        if length:
            index = [slice(None)] * len(tensor.shape)
            index[dim] = slice(start, start + length)
            parts.append(tensor.read(tuple(index)))
    if not parts:
        return None
    data = torch.cat(parts, dim) if len(parts) > 1 else parts[0]
    return data.t() if shard.transposed else data


def fill(region: torch.Tensor, shard: Shard | None, data: torch.Tensor | None) -> None:
    """Copy a checkpoint tensor's slice into its place in a parameter (checkpoint_table's region)."""
    if shard is None:
        region.copy_(data)
        return
    if shard.length < region.shape[shard.dim]:
        region.zero_()  # vocabulary padding, or a row-split bias that another rank holds
    if data is not None:
        region.narrow(shard.dim, 0, shard.length).copy_(data)


def load_weights(model: nn.Module, model_dir: Path, prefix: str, optional: frozenset[str] = frozenset()) -> None:
    """`optional`: tensors the checkpoint may lack (an embedding model's unused LM head)."""
    table = checkpoint_table(model)
    loaded, unexpected = set(), []
    with tqdm(desc="loading weights", unit="tensor", total=len(table), disable=distributed.rank() != 0) as bar:
        for path, names in weight_files(model_dir).items():
            with open_weights(path) as tensors:
                for name in tensors if names is None else names:
                    if name not in tensors:
                        raise LoadError(f"{path}: has no tensor {name}, which its index names")
                    target = name if name in table else prefix + name  # older saves lack the prefix
                    if target not in table:
                        unexpected.append(name)
                        continue
                    region, shard = table[target]
                    expected = checkpoint_shape(region, shard)
                    if tensors[name].shape != expected:
                        raise LoadError(f"{path}: tensor {name} has shape {tensors[name].shape}, "
                                        f"the model built from config.json expects {expected}")
                    fill(region, shard, read_slice(tensors[name], shard))
                    loaded.add(target)
                    bar.update()
    missing = sorted(set(table) - loaded - optional)
    if missing:
        raise LoadError(f"{model_dir}: the checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}")
    if unexpected:
        log.warning("ignored %d checkpoint tensors the model does not use, e.g. %s", len(unexpected), unexpected[:3])


def load_gguf(model: nn.Module, spec: ModelSpec) -> None:
    """Fill the model from a GGUF file, dequantized to float32 (bit-exact with gguf.quants.dequantize);
    then linears stored as Q4_0/Q4_1/Q4_K run on their own blocks through the int4 op, those stored
    as Q8_0/Q6_K/Q5_K/Q5_0/Q5_1 (or a mix) requantized through the int8 op, all-Q8_0 ones through
    cpu/q8_0.c on their own blocks where that times faster (quant_linear.swap_gguf_linears)."""
    from pagedserve.worker.quant_linear import swap_gguf_linears

    if next(model.parameters()).dtype != torch.float32 or next(model.parameters()).device.type != "cpu":
        raise LoadError(f"{spec.model_dir}: GGUF files are served in float32 on the CPU (--dtype float32)")
    tensors, blocks = gguf_checkpoint.read_tensors(spec.model_dir, vars(spec.hf_config))
    table = checkpoint_table(model)
    missing = sorted(set(table) - set(tensors))
    if missing:
        raise LoadError(f"{spec.model_dir}: the GGUF lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}")
    for name, (region, shard) in table.items():
        expected = checkpoint_shape(region, shard)
        if tensors[name].shape != expected:
            raise LoadError(f"{spec.model_dir}: tensor {name} has shape {tensors[name].shape}, "
                            f"the model built from its metadata expects {expected}")
        fill(region, shard, read_slice(tensors[name], shard))
    swapped = swap_gguf_linears(model, blocks)
    log.info("GGUF %s: %d linears run quantized (each kind's kernel: the kernel choices line), the rest in float32",
             spec.model_dir.name, swapped)


def quantize(model: nn.Module, method: str, dtype: torch.dtype, device: torch.device) -> None:
    """--quantization: weight-only int8/int4 linears (quant_linear.quantize_linears)."""
    from pagedserve.worker.quant_linear import quantize_linears

    if dtype != torch.float32 or device.type != "cpu":
        raise LoadError(f"--quantization {method} is served in float32 on the CPU (--dtype float32 --device cpu)")
    log.info("--quantization %s: %d linears quantized", method, quantize_linears(model, method))


def dummy_weights(model: nn.Module, seed: int) -> None:
    """Random values of the checkpoint's shapes, seeded by name: every rank slices the same
    tensors, so a dummy model is the same model at any tensor parallel size. Small values keep
    activations finite through many layers; the numbers mean nothing."""
    for name, (region, shard) in checkpoint_table(model).items():
        shape = checkpoint_shape(region, shard)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        full = torch.rand(shape, generator=generator) * 2e-3 - 1e-3
        fill(region, shard, read_slice(LazyTensor(shape, full.__getitem__), shard))


def materialize(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Real, uninitialised storage for every parameter of a model built on the meta device.
    (Module.to_empty does the same through torch's meta-tensor refs, which import sympy: seconds
    of every worker's start.) Ties are undone: the caller ties again."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                storage = torch.empty(param.shape, dtype=dtype, device=device)
                module._parameters[name] = nn.Parameter(storage, requires_grad=False)


# ----- the whole ---------------------------------------------------------------------------------


def context_length(config, spec: ModelSpec) -> int:
    hf_config = spec.hf_config
    max_position = getattr(hf_config, "max_position_embeddings", None)
    max_model_len = config.max_model_len or max_position
    if not max_model_len:
        raise LoadError(f"{spec.model_dir / 'config.json'}: no max_position_embeddings; pass --max-model-len")
    if max_position and max_model_len > max_position:
        log.warning("--max-model-len %d exceeds the model's max_position_embeddings %d", max_model_len, max_position)
    return max_model_len


def unused_tensors(config, spec: ModelSpec) -> frozenset[str]:
    """A model served for pooling never runs its LM head: a sentence-transformers checkpoint of
    the bare base model (Qwen3-Embedding's larger sizes) holds none."""
    runner = resolve_runner(spec.model_dir, getattr(config, "runner", "generate"),
                            getattr(config, "pooler_config", None), spec.hf_config)
    return frozenset({"lm_head.weight"}) if runner.runner == "pooling" else frozenset()


def load_model(config, backend) -> LoadedModel:
    """Build and fill the model that config.model names. `config` is a WorkerConfig."""
    spec = inspect_model_dir(config)
    if config.world_size != distributed.world_size():
        raise LoadError(f"--world-size {config.world_size}, but this process joined a group of "
                        f"{distributed.world_size()} (distributed.init first)")
    device = torch.device(config.device)
    dtype = resolve_dtype(config.dtype, spec.hf_config, device, bool(getattr(config, "quantization", None)))
    max_model_len = context_length(config, spec)
    try:
        with torch.device("meta"):
            model = spec.model_class(spec.hf_config, backend, max_model_len)
    except (ValueError, AttributeError) as e:  # a split that does not divide, a key the file lacks
        raise LoadError(f"{spec.model_dir / 'config.json'}: {e}") from None
    materialize(model, dtype, device)
    model.tie_weights()
    if config.load_format == "dummy":
        dummy_weights(model, config.seed)
    elif gguf_checkpoint.is_gguf(spec.model_dir):
        load_gguf(model, spec)
    else:
        load_weights(model, spec.model_dir, spec.model_class.checkpoint_prefix, unused_tensors(config, spec))
    if getattr(config, "quantization", None):
        quantize(model, config.quantization, dtype, device)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.build(device)
    model.eval()
    return LoadedModel(
        model=model,
        hf_config=spec.hf_config,
        architecture=spec.architecture,
        dtype=dtype,
        max_model_len=max_model_len,
        sliding_window=spec.model_class.kv_sliding_window(spec.hf_config),
        vocab_size=spec.hf_config.vocab_size,
        eos_token_ids=eos_token_ids(tokenizer_dir(config), spec.hf_config),
        sampling_defaults=sampling_defaults(tokenizer_dir(config)),
    )
