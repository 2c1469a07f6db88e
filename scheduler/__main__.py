"""python -m pagedserve.scheduler: the scheduler service, between the router and the worker ranks."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

from pagedserve.flags import add_arguments, from_namespace, lower_max_model_len
from pagedserve.parent_watch import stop_with_parent
from pagedserve.v1 import scheduler_pb2 as pb

from .config import SchedulerArgs, SchedulerConfig, default_max_num_batched_tokens
from .engine import Engine
from .scheduler import Scheduler
from .speculative_config import parse_speculative_config
from .service import SchedulerService, build_server, drain, watch_health
from .workers import WorkerGroup

log = logging.getLogger("pagedserve.scheduler")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pagedserve.scheduler", description=__doc__)
    add_arguments(p, SchedulerArgs)
    add_arguments(p, SchedulerConfig)
    args = p.parse_args(argv)
    try:
        parse_speculative_config(args.speculative_config)
    except ValueError as e:
        p.error(str(e))
    return args


def model_info(args, info) -> pb.ModelInfo:
    max_model_len = lower_max_model_len(args.max_model_len, info.max_model_len, "worker")
    name = args.served_model_name or os.path.basename(os.path.normpath(info.model_path))
    return pb.ModelInfo(
        served_model_name=name, model_path=info.model_path, max_model_len=max_model_len,
        eos_token_ids=info.eos_token_ids, vocab_size=info.vocab_size, block_size=info.block_size,
        num_kv_blocks=info.num_kv_blocks, tensor_parallel_size=info.world_size,
        sampling_defaults=info.sampling_defaults, runner=info.runner or "generate", pooler=info.pooler,
        is_matryoshka=info.is_matryoshka, matryoshka_dimensions=info.matryoshka_dimensions,
        hidden_size=info.hidden_size)


def scheduler_config(args, infos) -> SchedulerConfig:
    """The batching policy from the flags and the worker ranks' WorkerInfo (KV cache shape,
    context length, and the device, which sets the token budget's default)."""
    return from_namespace(
        SchedulerConfig, args, num_blocks=min(i.num_kv_blocks for i in infos),
        block_size=infos[0].block_size, max_model_len=model_info(args, infos[0]).max_model_len,
        sliding_window=infos[0].sliding_window if all(i.HasField("sliding_window") for i in infos) else None,
        max_num_batched_tokens=max(args.max_num_batched_tokens
                                   or default_max_num_batched_tokens(infos[0].device), 1))


async def serve(args) -> None:
    workers = WorkerGroup(args.worker_addrs.split(","))
    infos = await workers.wait_ready()
    info = model_info(args, infos[0])
    config = scheduler_config(args, infos)
    engine = Engine(Scheduler(config), workers, list(info.eos_token_ids),
                    resume_timeout=args.resume_timeout)
    service = SchedulerService(engine, info)
    server, health_servicer = build_server(service, f"{args.host}:{args.port}", args.api_key)
    await server.start()
    tasks = [asyncio.create_task(engine.run()), asyncio.create_task(watch_health(engine, health_servicer))]
    log.info("scheduler listening on %s:%d (model %s, %d KV blocks of %d tokens)", args.host,
             args.port, info.served_model_name, config.num_blocks, config.block_size)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stop_with_parent()
    await stop.wait()
    log.info("shutting down: letting requests in flight finish (up to %.0f s)", args.shutdown_timeout)
    await health_servicer.enter_graceful_shutdown()
    await drain(server, service, args.shutdown_timeout)
    for task in tasks:
        task.cancel()
    await workers.close()


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
