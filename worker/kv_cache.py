"""The paged KV cache: per layer one K and one V tensor of [num_blocks, block_size, kv_heads, head_dim].

The worker only owns the memory; which block belongs to whom is the scheduler's block manager.
The block count is what GetWorkerInfo reports, and the scheduler sizes its block pool from it.
"""
import logging

import torch

log = logging.getLogger(__name__)

CPU_DEFAULT_BYTES = 2 << 30  # 2 GiB: room for tens of thousands of tokens of a small model
GPU_MEMORY_UTILIZATION = 0.9  # of the memory still free once the weights are loaded
# A scheduler batches at most a few hundred sequences (vLLM's default max_num_seqs is 256): a cache
# holding more full-length sequences than that would sit unused.
MAX_USEFUL_SEQUENCES = 256


def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * block_size * kv_heads * head_dim * dtype.itemsize


def default_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_MEMORY_UTILIZATION)
    return CPU_DEFAULT_BYTES


def choose_num_blocks(config, shape: tuple[int, int, int], dtype: torch.dtype, device, max_model_len: int,
                      extra_bytes_per_block: int = 0) -> int:
    """--num-gpu-blocks-override as given; otherwise as many blocks as the memory budget holds,
    capped at what MAX_USEFUL_SEQUENCES sequences of max_model_len tokens could use.
    extra_bytes_per_block: another cache indexed by the same blocks (a draft model's), paid
    from the same budget."""
    if config.num_gpu_blocks_override:
        return config.num_gpu_blocks_override
    num_layers, kv_heads, head_dim = shape
    per_block = bytes_per_block(num_layers, config.block_size, kv_heads, head_dim, dtype) + extra_bytes_per_block
    if extra_bytes_per_block:
        log.info("the draft model's KV cache takes %d of each block's %d bytes", extra_bytes_per_block, per_block)
    budget = config.kv_cache_memory_bytes or default_cache_bytes(torch.device(device))
    blocks_per_seq = -(-max_model_len // config.block_size)
    num_blocks = min(budget // per_block, MAX_USEFUL_SEQUENCES * blocks_per_seq)
    if num_blocks < blocks_per_seq:
        raise ValueError(
            f"a KV cache of {budget} bytes holds {num_blocks} blocks of {config.block_size} tokens, not enough for "
            f"one sequence of max_model_len={max_model_len}: raise --kv-cache-memory-bytes or lower --max-model-len"
        )
    return num_blocks


def allocate_kv_cache(num_blocks: int, block_size: int, shape, dtype, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # Zeroed, not empty: attention over a padded gather multiplies masked slots' V by 0, and
    # uninitialised memory may hold NaN, which 0 does not cancel.
    num_layers, kv_heads, head_dim = shape
    cache_shape = (num_blocks, block_size, kv_heads, head_dim)
    caches = [
        (torch.zeros(cache_shape, dtype=dtype, device=device), torch.zeros(cache_shape, dtype=dtype, device=device))
        for _ in range(num_layers)
    ]
    total = bytes_per_block(num_layers, block_size, kv_heads, head_dim, dtype) * num_blocks
    log.info("KV cache: %d blocks of %d tokens (%d tokens, %.1f MiB)", num_blocks, block_size,
             num_blocks * block_size, total / 2**20)
    return caches
