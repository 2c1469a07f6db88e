"""What a worker is asked to serve: the flags of `python -m worker`, as one dataclass.

Tests build a WorkerConfig directly; `__main__` builds it from argparse. Nothing here is derived
from the model: that happens in the loader once config.json has been read.
"""
from dataclasses import dataclass


@dataclass
class WorkerConfig:
    model: str
    device: str = "cpu"  # cpu | cuda
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    max_model_len: int | None = None  # None: config.json's max_position_embeddings
    block_size: int = 16
    kv_cache_memory_bytes: int | None = None  # None: a default per device (see kv_cache.py)
    num_gpu_blocks_override: int | None = None  # exact number of KV blocks; wins over the bytes
    attention_backend: str = "auto"  # auto | torch | triton
    load_format: str = "auto"  # auto | dummy
    enforce_eager: bool = False  # True: no CUDA graphs
    max_cudagraph_capture_size: int = 512  # largest decode batch captured as a CUDA graph
    max_num_seqs: int = 256  # the scheduler's: caps the captured batch sizes
    seed: int = 0
    num_threads: int | None = None  # None: every core this process may run on
    rank: int = 0  # tensor parallel rank of this process, in [0, world_size)
    world_size: int = 1  # tensor parallel size: how many worker processes share the model
    dist_init_addr: str | None = None  # host:port where rank 0 hosts the ranks' rendezvous
