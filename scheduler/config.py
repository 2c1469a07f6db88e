"""The scheduler's flags, as dataclasses whose fields carry their defaults and help
(pagedserve/flags.py turns them into options of `python -m pagedserve.scheduler` and `pagedserve serve`)."""
from __future__ import annotations

from dataclasses import dataclass

from pagedserve.flags import (api_key_flag, enable_lora_flag, flag, log_level_flag, max_loras_flag,
                              max_num_seqs_flag, resume_timeout_flag, served_model_name_flag,
                              shutdown_timeout_flag, speculative_config_flag)

# Tokens per step when --max-num-batched-tokens is not given: vLLM raises it to 8192 on H100-class
# GPUs, where bigger prefill chunks keep the device busy; 2048 suits the CPU (docs/PERFORMANCE.md).
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"cuda": 8192, "cpu": 2048}


@dataclass
class SchedulerConfig:
    """The batching policy's knobs (flags of the scheduler and of `pagedserve serve`) and the KV
    cache's shape, which the workers report."""

    num_blocks: int
    block_size: int
    max_model_len: int
    # The workers' WorkerInfo.sliding_window: every layer attends within it, so blocks behind it
    # are released while a sequence runs (None: kept until it ends).
    sliding_window: int | None = None
    max_num_seqs: int = max_num_seqs_flag()
    max_num_batched_tokens: int | None = flag(
        None, "most tokens computed in one step, the budget that decodes and prefill chunks "
        "share (default: by the workers' device, 8192 on cuda, 2048 on cpu)")
    enable_prefix_caching: bool = flag(True, "reuse the KV blocks of prompt prefixes seen before")
    max_waiting_requests: int = flag(0, "requests queued beyond the batch before Generate answers "
                                     "RESOURCE_EXHAUSTED (0: unbounded)")
    async_scheduling: bool = flag(False, "build and send the next step's plan while the current step "
                                  "runs, so the scheduler's work overlaps the workers' (outputs are "
                                  "unchanged; a sequence that finishes computes one token that is "
                                  "thrown away)")
    speculative_config: str | None = speculative_config_flag()
    enable_lora: bool = enable_lora_flag()
    max_loras: int = max_loras_flag()


@dataclass
class SchedulerArgs:
    """The scheduler process's own flags; the batching policy's are SchedulerConfig's."""

    worker_addrs: str = flag(help="comma-separated HOST:PORT of every worker rank, rank 0 first")
    host: str = flag("127.0.0.1")
    port: int = flag(50051, "the public gRPC API's port")
    served_model_name: str | None = served_model_name_flag()
    max_model_len: int | None = flag(None, "cap the context below the workers' (default: theirs)")
    api_key: str | None = api_key_flag()
    shutdown_timeout: float = shutdown_timeout_flag()
    resume_timeout: float = resume_timeout_flag()
    log_level: str = log_level_flag()


def default_max_num_batched_tokens(device: str) -> int:
    """The token budget for the workers' device ("cpu", "cuda" or "cuda:N")."""
    return DEFAULT_MAX_NUM_BATCHED_TOKENS[device.split(":")[0]]
