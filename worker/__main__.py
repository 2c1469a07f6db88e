"""python -m pagedserve.worker --model DIR: load the model, allocate the KV cache, serve step plans over gRPC.

Under tensor parallelism there is one such process per rank (--rank, --world-size), each with its
own gRPC port; they join one torch.distributed group at --dist-init-addr before loading their
shares of the weights. A rank whose group breaks exits: the group can only restart as a whole.
"""
import argparse
import logging
import os
import signal
import sys
import threading

# Before torch loads libgomp, which reads it once: an OpenMP thread that finishes a parallel region
# spins GOMP_SPINCOUNT pause instructions (10,000: about 0.1 ms at this Xeon's 10 ns a pause, up to
# ~0.5 ms where a pause takes 140 cycles) before it sleeps. That covers the gaps between one step's
# regions, where sleeping (OMP_WAIT_POLICY=passive, the default until 8 December 2026) paid a futex
# wake-up per region: 48 against 32 ms a step at batch 1, 110 against 96 at batch 32 on quiet cores.
# It is short enough that the threads still sleep between steps, when the router and scheduler need
# the cores; libgomp's own default (300,000, ~3 ms) and active waiting collapse on busy cores, where
# a spinner holds the core the next region needs (docs/PERFORMANCE.md, "OpenMP threads"). Set
# OMP_WAIT_POLICY (active, passive) or GOMP_SPINCOUNT to choose otherwise.
DEFAULT_SPIN_COUNT = "10000"


def set_openmp_wait(environ) -> None:
    """Before torch loads libgomp: a bounded spin unless the environment chose a policy or a count."""
    if "GOMP_SPINCOUNT" not in environ and "OMP_WAIT_POLICY" not in environ:
        environ["GOMP_SPINCOUNT"] = DEFAULT_SPIN_COUNT


set_openmp_wait(os.environ)

from pagedserve.flags import add_arguments, from_namespace
from pagedserve.parent_watch import exit_within_after_signal, stop_with_parent
from pagedserve.worker.config import WorkerArgs, WorkerConfig

log = logging.getLogger("pagedserve.worker")

GRACE_S = 5.0  # for the steps the scheduler has already sent when the worker is told to stop
SHUTDOWN_DEADLINE_S = 30.0  # from the signal to the end of the process, whatever happens


def parse_args(argv=None) -> WorkerArgs:
    p = argparse.ArgumentParser(prog="python -m pagedserve.worker", description=__doc__)
    add_arguments(p, WorkerArgs)
    return from_namespace(WorkerArgs, p.parse_args(argv))


def worker_config(args: WorkerArgs) -> WorkerConfig:
    config = from_namespace(WorkerConfig, args)
    if config.num_threads is None and config.device == "cpu" and config.world_size > 1:
        config.num_threads = max(1, len(os.sched_getaffinity(0)) // config.world_size)
    return config


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop, signaled = threading.Event(), threading.Event()

    def on_signal(*_):
        signaled.set()
        stop.set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    # The graceful part below takes GRACE_S and a step; should anything hang (a gRPC thread, a
    # collective, the main thread itself), the process still ends, every thread's stack in its log.
    exit_within_after_signal(SHUTDOWN_DEADLINE_S)
    stop_with_parent()

    # After the flags: importing torch takes seconds.
    import torch

    from pagedserve.worker import distributed
    from pagedserve.worker.loader import inspect_model_dir
    from pagedserve.worker.model_runner import ModelRunner
    from pagedserve.worker.service import build_server
    from pagedserve.worker.step_loop import StepLoop

    # Stopped on purpose, so are the other ranks: their leaving is no failure.
    threading.Thread(target=lambda: (signaled.wait(), distributed.stop_watching()), daemon=True).start()

    config = worker_config(args)
    try:
        inspect_model_dir(config)  # a bad directory fails here, before the rendezvous port opens
        distributed.init(config.rank, config.world_size, config.dist_init_addr, torch.device(config.device))
        runner = ModelRunner(config)
    except (OSError, ValueError, RuntimeError) as e:
        log.error("%s", e)
        return 1
    if stop.is_set():
        log.info("stopped while loading: exiting")
        return 0
    step_loop = StepLoop()
    server, health_servicer = build_server(runner, f"{args.host}:{args.port}", step_loop)
    server.start()
    log.info("worker listening on %s:%d (rank %d of %d)", args.host, args.port, config.rank, config.world_size)
    # A broken tensor parallel group ends this rank too: its peers' shares of the model are gone.
    threading.Thread(target=lambda: (distributed.failed.wait(), stop.set()), daemon=True).start()
    step_loop.serve(until=stop)  # this thread loaded the model; it runs every step too
    code = 1 if distributed.failed.is_set() and not signaled.is_set() else 0
    if code:
        log.error("the tensor parallel group is broken (a rank died): exiting so that every rank restarts")
    log.info("shutting down")
    health_servicer.enter_graceful_shutdown()
    stopped = server.stop(grace=0 if code else GRACE_S)
    step_loop.serve(until=stopped)  # steps already asked for still run in the grace period
    step_loop.close()
    distributed.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
