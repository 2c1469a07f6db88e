"""The flags of `pagedserve serve` (which `run-batch` and the offline `LLM` take too), gathered
from the processes' own flag dataclasses, and the argv that hands each process its share.

`serve` adds only the flags of its own (LauncherArgs); a flag that several processes take
(`--max-model-len`, `--api-key`...) appears once and goes to each of them. The addresses, ports
and ranks that `serve` chooses itself are not options of `serve`.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from pagedserve.router.settings import RouterArgs
from pagedserve.scheduler.config import SchedulerArgs, SchedulerConfig
from pagedserve.worker.config import WorkerArgs

from pagedserve.flags import add_arguments, flag, to_argv

# Per process: the flags that `serve` sets itself.
WORKER_INTERNAL = ("host", "port", "rank", "world_size", "dist_init_addr")
SCHEDULER_INTERNAL = ("worker_addrs", "host", "port")
ROUTER_INTERNAL = ("scheduler_addr", "scheduler_addrs", "host", "port")


@dataclass
class LauncherArgs:
    """What only `pagedserve serve` takes."""

    host: str = flag("0.0.0.0", "address the OpenAI API and the gRPC API listen on")
    port: int = flag(8000, "HTTP port of the OpenAI API")
    grpc_port: int = flag(50051, "the scheduler's public gRPC port")
    tensor_parallel_size: int = flag(1, "worker ranks the model is split across", short="-tp")
    data_parallel_size: int = flag(1, "engine replicas (a scheduler and its tensor parallel "
                                   "workers each, on CUDA each on GPUs of its own) behind the "
                                   "one router; replica i's scheduler serves gRPC on "
                                   "--grpc-port + i", short="-dp")
    startup_timeout: float = flag(600.0, "seconds each process gets to become healthy")


def add_serve_args(p: argparse.ArgumentParser | argparse._ArgumentGroup,
                   model_required: bool = True, skip: tuple[str, ...] = ()) -> set[str]:
    """Adds serve's flags but those in `skip` (field names: "grpc_port") to p, a parser or an
    argument group; returns the names (argparse dests) of the flags it added."""
    seen: set[str] = set(skip)
    add_arguments(p, LauncherArgs, seen=seen)
    add_arguments(p, WorkerArgs, skip=WORKER_INTERNAL, required=model_required, seen=seen)
    add_arguments(p, SchedulerConfig, seen=seen)
    add_arguments(p, SchedulerArgs, skip=SCHEDULER_INTERNAL, seen=seen)
    add_arguments(p, RouterArgs, skip=ROUTER_INTERNAL, seen=seen)
    return seen - set(skip)


def worker_argv(args: argparse.Namespace) -> list[str]:
    return to_argv(args, WorkerArgs, skip=WORKER_INTERNAL)


def scheduler_argv(args: argparse.Namespace) -> list[str]:
    return to_argv(args, SchedulerArgs, skip=SCHEDULER_INTERNAL) + to_argv(args, SchedulerConfig)


def router_argv(args: argparse.Namespace) -> list[str]:
    return to_argv(args, RouterArgs, skip=ROUTER_INTERNAL)


def check_serve_args(args: argparse.Namespace) -> str | None:
    """The first JSON-valued flag (--speculative-config, --pooler-config, --lora-modules) its
    process would refuse, as that process words it; None when all parse. `serve` asks before it
    starts anything, so a typo costs no model load and names `serve`, not a child process."""
    from pagedserve.router.lora import parse_lora_module
    from pagedserve.scheduler.speculative_config import parse_speculative_config
    from pagedserve.worker.pooling_config import PoolingConfigError, from_flag

    checks = [lambda: parse_speculative_config(args.speculative_config),
              lambda: from_flag(args.pooler_config),
              *(lambda m=m: parse_lora_module(m) for m in args.lora_modules or ())]
    for check in checks:
        try:
            check()
        except (ValueError, PoolingConfigError) as e:
            return str(e)
    return None
