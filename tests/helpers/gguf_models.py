"""A tiny random Llama written as a GGUF file with the `gguf` package (GGUFWriter), its linears
in a mix of quantized types, and the transformers model holding the same weights dequantized to
float32 (the reference the served GGUF is held to). No download.

Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 come from gguf.quants.quantize; the K-quants (Q4_K, Q5_K, Q6_K),
which that package cannot make, are random blocks with sane fp16 scales. q_proj/k_proj rows are written in
llama.cpp's interleaved rope order, as its convert_hf_to_gguf.py writes them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, VOCAB = 256, 256, 2, 4, 2, 1000
# per transformers name (the layer's suffix): the GGUF type of each tensor; linears of layer 0
# are all 4-bit blocks (the int4 path), layer 1 mixes in Q8_0 and K-quants (dequantized on load).
TYPES = {
    "model.embed_tokens.weight": "Q8_0", "lm_head.weight": "Q6_K",
    "0.q_proj": "Q4_0", "0.k_proj": "Q4_0", "0.v_proj": "Q4_1", "0.o_proj": "Q4_1",
    "0.gate_proj": "Q4_1", "0.up_proj": "Q4_0", "0.down_proj": "Q4_1",
    "1.q_proj": "Q4_K", "1.k_proj": "Q6_K", "1.v_proj": "Q8_0", "1.o_proj": "Q4_0",
    "1.gate_proj": "Q8_0", "1.up_proj": "Q4_K", "1.down_proj": "Q6_K",
}
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def config(tied: bool = False):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                       num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                       max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                       tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def gguf_name(hf_name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    parts = hf_name.split(".")  # model.layers.3.self_attn.q_proj.weight
    return f"blk.{parts[2]}.{GGUF_NAMES[parts[-2]]}.weight"


def qtype_of(hf_name: str, types: dict | None = None) -> str:
    types = TYPES if types is None else types
    if hf_name in types:
        return types[hf_name]
    parts = hf_name.split(".")
    return types.get(f"{parts[2]}.{parts[-2]}", "F32") if parts[1] == "layers" else "F32"


def all_of(qtype: str) -> dict:
    """A TYPES table with every linear, the embedding and the LM head in `qtype`."""
    return {name: qtype for name in TYPES}


# the smallest super-block scale d: |w| about d * sub-block scale (~48; Q6_K ~96) * |q - middle|
KQUANT_D = {"Q4_K": 1e-4, "Q5_K": 5e-5, "Q6_K": 1.5e-5}


def random_kquant_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Random Q4_K/Q5_K/Q6_K blocks uint8 [rows, bytes] shaped like a quantized model's: fp16
    super-block scales within 2x of each other along a row, sized for weights of about 0.03
    (KQUANT_D; weights of 0.3 made the tiny model's attention a hard argmax, so rounding flipped it), sub-block scales in the upper half of
    their range (6-bit 32-63; Q6_K's int8 64-127 either sign), as a quantizer that scales each to
    its block's largest weight leaves them; Q4_K/Q5_K's sub-block minimums about the middle code
    times the scale (each mn = its sc, dmin = d times 6-10 for Q4_K, 12-20 for Q5_K), so weights
    are centred on 0 (fully random bytes made every weight of a row positive, and logits huge)."""
    from gguf.constants import GGML_QUANT_SIZES
    block, size = GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    low = KQUANT_D[qtype.name]
    uniform = lambda low, high: rng.uniform(low, high, size=(rows, cols // block, 1)).astype(np.float32)
    if qtype.name in ("Q4_K", "Q5_K"):
        d = uniform(low, 2 * low)
        middle = 8 if qtype.name == "Q4_K" else 16
        dmin = d * uniform(0.75 * middle, 1.25 * middle)
        data[..., 0:4] = np.concatenate([d, dmin], -1).astype(np.float16).view(np.uint8)
        # scales bytes 0-3 (sc 0-3 and sc 4-7's top bits), 4-7 the same for mn; 8-11 nibbles: sc | mn << 4
        data[..., 4:8] |= 0xA0  # bit 5 of sc 0-3 (bits 0-5) and of sc 4-7 (bits 6-7 are its 4-5)
        data[..., 8:12] = data[..., 4:8]
        data[..., 12:16] = (data[..., 12:16] & 0x0F) * 0x11
    else:
        data[..., size - 2:] = uniform(low, 2 * low).astype(np.float16).view(np.uint8)  # Q6_K's d is last
        scales = data[..., size - 18:size - 2]  # 16 int8 sub-block scales before d
        data[..., size - 18:size - 2] = (scales | 0x40) & 0x7F | (scales & 0x80)  # |scale| in 64-127
    return data.reshape(rows, -1)


def interleave_rope_rows(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows."""
    n = rows.shape[0]
    return rows.reshape(n_heads, 2, n // n_heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def write(path: Path, seed: int = 0, types: dict | None = None, tied: bool = False):
    """Write the GGUF at `path` (each tensor's type from `types`, default TYPES) and a tokenizer
    beside it in path.parent / "tokenizer"; returns the transformers LlamaForCausalLM (eval,
    float32) holding the dequantized weights. `tied`: no output.weight, the LM head is the
    embedding (as SmolLM2's files are)."""
    import gguf
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize
    from transformers import LlamaForCausalLM

    from tests.helpers.tiny_models import tokenizer

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = LlamaForCausalLM(config(tied)).eval()
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in [("block_count", LAYERS), ("context_length", 256), ("embedding_length", HIDDEN),
                       ("feed_forward_length", INTERMEDIATE), ("head_count", HEADS), ("head_count_kv", KV_HEADS),
                       ("rope_dimension_count", HIDDEN // HEADS), ("vocab_size", VOCAB)]:
        getattr(writer, f"add_{key}")(value)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    state = {}
    for name, param in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # the embedding's tensor
        weight = param.detach().numpy().astype(np.float32)
        if "norm" not in name:
            weight = weight * 0.05  # activations of a sane size through the layers
        qtype = getattr(T, qtype_of(name, types))
        if qtype == T.F32:
            data = weight
        elif qtype in (T.Q4_K, T.Q5_K, T.Q6_K):
            data = random_kquant_blocks(qtype, *weight.shape, rng)
        else:
            data = quantize(weight, qtype)
        state[name] = torch.from_numpy(np.array(dequantize(data, qtype).reshape(weight.shape), dtype=np.float32))
        heads = HEADS if "q_proj" in name else KV_HEADS if "k_proj" in name else None
        if heads:
            data = interleave_rope_rows(data, heads)
        writer.add_tensor(gguf_name(name), data, raw_shape=data.shape if qtype != T.F32 else None,
                          raw_dtype=qtype if qtype != T.F32 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state)
    tokenizer().save_pretrained(path.parent / "tokenizer")
    return model
