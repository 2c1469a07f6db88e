"""A GGUF file (llama.cpp's format) read as a checkpoint: its config and its tensors under
transformers' names, so `--model path/to/model.gguf --tokenizer DIR` serves it as it is (vLLM's
convention: the tokenizer, chat template and generation_config.json come from DIR).

Read with the `gguf` package (GGUFReader memory-maps the file). Every tensor reads as float32,
dequantized by `gguf.quants.dequantize` (so bit-exact with it, for every type that package knows:
Q8_0, Q4_0, Q4_1, Q4_K, Q6_K, ...); the raw blocks of quantized linears stay at hand (`QuantBlocks`)
for quant_linear.py's int4 (Q4_0/Q4_1/Q4_K) and int8 (Q8_0/Q6_K/Q5_K/Q5_0/Q5_1, requantized) matmuls. Only the Llama family (GGUF architecture "llama") is mapped.

llama.cpp's convert_hf_to_gguf.py reorders each head's q/k rows from transformers' rotate-half
layout ([first half; second half]) to interleaved pairs; `unpermute_rows` is its inverse,
applied to whole rows, so it holds for the quantized blocks (which run along a row) as well.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pagedserve.worker.checkpoint import LazyTensor, LoadError

GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def is_gguf(path) -> bool:
    return Path(path).is_file() and Path(path).suffix == ".gguf"


def open_reader(path: Path):
    import gguf
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError and struct errors for a bad file
        raise LoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(path: Path) -> dict:
    """A config.json-like dict (LlamaForCausalLM) from the GGUF's `llama.*` metadata.
    Raises LoadError for another architecture or missing keys."""
    reader = open_reader(path)
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise LoadError(f"{path}: GGUF architecture {arch!r}; only 'llama' (the Llama family) is served")
    try:
        heads = field(reader, "llama.attention.head_count")
        hidden = field(reader, "llama.embedding_length")
        names = {t.name for t in reader.tensors}
        vocab = field(reader, "llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
        return {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": int(vocab),
            "hidden_size": int(hidden),
            "intermediate_size": int(field(reader, "llama.feed_forward_length")),
            "num_hidden_layers": int(field(reader, "llama.block_count")),
            "num_attention_heads": int(heads),
            "num_key_value_heads": int(field(reader, "llama.attention.head_count_kv", heads)),
            "head_dim": int(field(reader, "llama.rope.dimension_count", hidden // heads)),
            "max_position_embeddings": int(field(reader, "llama.context_length")),
            "rope_theta": float(field(reader, "llama.rope.freq_base", 10000.0)),
            # stored as float32 (9.99999975e-06 for 1e-5): the config's readable value back
            "rms_norm_eps": float(f"{field(reader, 'llama.attention.layer_norm_rms_epsilon'):.6g}"),
            "hidden_act": "silu",
            "tie_word_embeddings": "output.weight" not in names,
            "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
            "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
            "torch_dtype": "float32",
        }
    except (TypeError, KeyError) as e:
        raise LoadError(f"{path}: GGUF metadata lacks a llama key ({e})") from None


def hf_name(gguf_name: str) -> str | None:
    """transformers' name of a GGUF tensor ("blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight");
    None for one the Llama model does not read (rope_freqs)."""
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}.{parts[3]}"
    return None


def unpermute_rows(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """[out, ...] rows of q_proj/k_proj from llama.cpp's interleaved order back to transformers'."""
    n = rows.shape[0]
    return rows.reshape(n_heads, n // n_heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


@dataclass
class QuantBlocks:
    """A linear weight as its GGUF blocks: `data` uint8 [out_features, bytes per row], rows in
    transformers' order, `type` a gguf.GGMLQuantizationType, `in_features` the row length."""
    type: object
    data: np.ndarray
    in_features: int


def read_tensors(path: Path, config: dict) -> tuple[dict[str, LazyTensor], dict[str, QuantBlocks]]:
    """Every tensor the model reads, by transformers' name, as float32 on read; and the raw
    blocks of each quantized 2-D tensor (for a quantized matmul)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    reader = open_reader(path)
    heads = {"self_attn.q_proj": config["num_attention_heads"], "self_attn.k_proj": config["num_key_value_heads"]}
    tensors, blocks = {}, {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            continue
        shape = [int(d) for d in reversed(t.shape)]  # ggml lists dimensions fastest first
        n_heads = next((n for module, n in heads.items() if f".{module}." in name), None)
        raw = t.data.reshape(shape[0], -1) if len(shape) == 2 else t.data
        if n_heads is not None:
            raw = unpermute_rows(raw, n_heads)
        quantized = t.tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
        if quantized and len(shape) == 2:
            blocks[name] = QuantBlocks(t.tensor_type, raw, shape[1])
        tensors[name] = LazyTensor(shape, _reader(raw, t.tensor_type, shape, dequantize))
    return tensors, blocks


def _reader(raw: np.ndarray, qtype, shape: list[int], dequantize):
    def read(index: tuple) -> torch.Tensor:
        values = dequantize(np.asarray(raw), qtype).reshape(shape)
        # a copy: F32 tensors are read-only views of the memory-mapped file
        return torch.from_numpy(np.array(values, dtype=np.float32, order="C", copy=True))[index]
    return read
