"""What a worker is asked to serve: the flags of `python -m pagedserve.worker`, as one dataclass.

Tests build a WorkerConfig directly; `__main__` and `pagedserve serve` build their options from
its fields (pagedserve/flags.py), so each default and help text is written here only. Nothing here
is derived from the model: that happens in the loader once config.json has been read.
"""
from __future__ import annotations

from dataclasses import dataclass

from pagedserve.flags import (enable_lora_flag, flag, log_level_flag, max_lora_rank_flag, max_loras_flag,
                              max_model_len_flag, max_num_seqs_flag, model_flag,
                              speculative_config_flag)


@dataclass
class WorkerConfig:
    model: str = model_flag()
    device: str = flag("cpu", "where the model runs", choices=["cpu", "cuda"])
    dtype: str = flag("auto", "auto: the checkpoint's dtype on CUDA; on the CPU bfloat16 for a "
                      "bfloat16/float16 checkpoint where the CPU has AVX-512 BF16 or AMX, else float32",
                      choices=["auto", "float32", "bfloat16", "float16"])
    max_model_len: int | None = max_model_len_flag()
    block_size: int = flag(16, "tokens per KV cache block")
    kv_cache_memory_bytes: int | None = flag(
        None, "KV cache budget (default: 2 GiB on CPU, 90%% of free memory on CUDA)", group="kv")
    num_gpu_blocks_override: int | None = flag(
        None, "exact number of KV cache blocks, in place of --kv-cache-memory-bytes", group="kv")
    attention_backend: str = flag("auto", "auto: triton on CUDA, torch on CPU",
                                  choices=["auto", "torch", "triton"])
    load_format: str = flag("auto", "dummy: random weights of the right shapes, for benchmarks",
                            choices=["auto", "dummy"])
    enforce_eager: bool = flag(False, "never capture CUDA graphs for decode steps (they are always "
                               "off on the CPU)")
    max_cudagraph_capture_size: int = flag(512, "largest decode batch captured as a CUDA graph "
                                           "(capped at --max-num-seqs)")
    max_num_seqs: int = max_num_seqs_flag()  # no decode batch is larger: none is captured larger
    seed: int = flag(0, "seeds sampling for requests without a seed (every rank gets the same)")
    num_threads: int | None = flag(
        None, "torch CPU threads per worker (default: the cores this process may use, divided "
        "among the tensor parallel ranks on the CPU, which are assumed to share a host)")
    rank: int = flag(0, "tensor parallel rank of this worker, in [0, world_size)")
    world_size: int = flag(1, "tensor parallel size: how many worker processes share the model")
    dist_init_addr: str | None = flag(
        None, "host:port of rank 0's torch.distributed store (tensor parallelism)")
    runner: str = flag("auto", "generate: a causal LM; pooling: an embedding model (/v1/embeddings); "
                       "auto: pooling for a sentence-transformers checkpoint (modules.json with a "
                       "Pooling module), else generate", choices=["auto", "generate", "pooling"])
    quantization: str | None = flag(
        None, "weight-only quantization of a float checkpoint's linears on the CPU: int8 (per "
        "output channel) or int4 (groups of 32); kept float32 where the CPU runs them slower",
        choices=["int8", "int4"])
    tokenizer: str | None = flag(
        None, "the directory of the tokenizer, chat template and generation_config.json (needed "
        "with --model FILE.gguf; default: the model directory)")
    pooler_config: str | None = flag(
        None, "with --runner pooling: JSON overriding the checkpoint's pooling, e.g. "
        "'{\"pooling_type\": \"MEAN\", \"normalize\": false}' (pooling_type LAST, MEAN or CLS)")
    enable_lora: bool = enable_lora_flag()
    max_loras: int = max_loras_flag()
    max_lora_rank: int = max_lora_rank_flag()
    max_cpu_loras: int | None = flag(None, "LoRA adapters kept read in host memory (default: --max-loras)")
    speculative_config: str | None = speculative_config_flag()


@dataclass
class WorkerArgs(WorkerConfig):
    """The worker's flags: what it serves, and where it listens."""

    host: str = flag("127.0.0.1")
    port: int = flag(50061)
    log_level: str = log_level_flag()
