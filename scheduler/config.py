"""The scheduler's flags, as dataclasses whose fields carry their defaults and help
(pagedserve/flags.py turns them into options of `python -m scheduler` and `pagedserve serve`)."""
from __future__ import annotations

from dataclasses import dataclass

from pagedserve.flags import (api_key_flag, flag, log_level_flag, served_model_name_flag,
                              shutdown_timeout_flag)


@dataclass
class SchedulerConfig:
    """The batching policy's knobs (flags of the scheduler and of `pagedserve serve`) and the KV
    cache's shape, which the workers report."""

    num_blocks: int
    block_size: int
    max_model_len: int
    max_num_seqs: int = flag(256, "most sequences in one step's batch")
    max_num_batched_tokens: int = flag(2048, "most tokens computed in one step (the token budget "
                                       "that decodes and prefill chunks share)")
    enable_prefix_caching: bool = flag(True, "reuse the KV blocks of prompt prefixes seen before")
    max_waiting_requests: int = flag(0, "requests queued beyond the batch before Generate answers "
                                     "RESOURCE_EXHAUSTED (0: unbounded)")


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
    log_level: str = log_level_flag()
