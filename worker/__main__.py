"""python -m worker --model DIR: load the model, allocate the KV cache, serve step plans over gRPC."""
import argparse
import logging
import os
import signal
import sys
import threading

from worker.config import WorkerConfig

log = logging.getLogger("worker")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50061)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto: float32 on CPU, the checkpoint's dtype on CUDA")
    p.add_argument("--max-model-len", type=int, help="default: config.json's max_position_embeddings")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--kv-cache-memory-bytes", type=int,
                       help="KV cache budget (default: 2 GiB on CPU, 90%% of free memory on CUDA)")
    cache.add_argument("--num-gpu-blocks-override", type=int, help="exact number of KV cache blocks")
    p.add_argument("--attention-backend", choices=["auto", "torch", "triton"], default="auto",
                   help="auto: triton on CUDA, torch on CPU")
    p.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                   help="dummy: random weights of the right shapes, for benchmarks")
    p.add_argument("--seed", type=int, default=0, help="seeds sampling for requests without a seed")
    p.add_argument("--num-threads", type=int, help="torch CPU threads (default: every core this process may use)")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--dist-init-addr", help="host:port of rank 0's torch.distributed store (tensor parallelism)")
    p.add_argument("--log-level", default=os.environ.get("PAGEDSERVE_LOG_LEVEL", "INFO"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.world_size != 1:
        log.error("tensor parallelism (--world-size %d) is not implemented yet; run one worker with --world-size 1",
                  args.world_size)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    from worker.model_runner import ModelRunner  # after the flags: importing torch takes seconds
    from worker.service import build_server

    config = WorkerConfig(**{k: v for k, v in vars(args).items() if k not in ("host", "port", "dist_init_addr", "log_level")})
    try:
        runner = ModelRunner(config)
    except (OSError, ValueError, RuntimeError) as e:
        log.error("%s", e)
        return 1
    if stop.is_set():
        return 0
    server, health_servicer = build_server(runner, f"{args.host}:{args.port}")
    server.start()
    log.info("worker listening on %s:%d", args.host, args.port)
    stop.wait()
    log.info("shutting down")
    health_servicer.enter_graceful_shutdown()
    server.stop(grace=5).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
