"""The tensor parallel group: which rank this worker process is, and the two collectives the model
needs (Megatron-style, see docs/ARCHITECTURE.md): the sum of partial outputs after each row-split projection
and after the vocabulary-split embedding, and the gather of the logits' vocabulary slices.

One process per rank. Ranks meet at --dist-init-addr, where rank 0 hosts the rendezvous store, so
they may be separate containers or hosts; gloo on CPU, NCCL on CUDA. With one rank nothing here
communicates and the model runs as if this file did not exist.

A collective that fails (a peer crashed: gloo notices its closed socket at once) leaves the group
unusable: `failed` is set, and the worker's main loop exits so that the group can be restarted as a
whole. A peer that hangs without closing its connection is given up after COLLECTIVE_TIMEOUT. An
idle group runs no collectives, so each rank also beats a counter in rank 0's store: a rank that
stops beating for PEER_TIMEOUT, or a store that goes away with rank 0, sets `failed` as well, so no
rank lingers in a group that lost a member (a restarted rank could never rejoin it).
"""
import datetime
import logging
import threading
import time

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
BEAT_INTERVAL_S = 1.0
PEER_TIMEOUT_S = 30.0  # generous: a rank loading a large checkpoint may be slow to beat

_stopping = threading.Event()

_rank, _world_size = 0, 1
failed = threading.Event()


class GroupBroken(RuntimeError):
    """A collective failed: some rank is gone, and with it every rank's share of the model."""


def init(rank: int, world_size: int, init_addr: str | None, device: torch.device) -> None:
    """Joins the group (blocks until every rank has joined); with world_size 1, only checks rank."""
    global _rank, _world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"--rank {rank} is not in [0, --world-size {world_size})")
    if world_size == 1:
        return
    if not init_addr:
        raise ValueError(f"--world-size {world_size} needs --dist-init-addr HOST:PORT (rank 0's rendezvous)")
    backend = "gloo"
    if device.type == "cuda":
        # Ranks that share a host take one GPU each; ranks in their own containers see cuda:0.
        torch.cuda.set_device(rank % torch.cuda.device_count())
        backend = "nccl"
    log.info("rank %d of %d: joining the %s group at %s", rank, world_size, backend, init_addr)
    dist.init_process_group(backend, init_method=f"tcp://{init_addr}", rank=rank, world_size=world_size,
                            timeout=COLLECTIVE_TIMEOUT)
    _rank, _world_size = rank, world_size
    threading.Thread(target=_watch_peers, args=(init_addr,), name="tp-heartbeat", daemon=True).start()


def _watch_peers(init_addr: str) -> None:
    host, port = init_addr.rsplit(":", 1)
    try:
        store = dist.TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=10))
        seen = {peer: (-1, time.monotonic()) for peer in range(_world_size) if peer != _rank}
        while not _stopping.wait(BEAT_INTERVAL_S):
            store.add(f"pagedserve/beat/{_rank}", 1)
            for peer, (count, since) in seen.items():
                now_count = store.add(f"pagedserve/beat/{peer}", 0)
                if now_count != count:
                    seen[peer] = (now_count, time.monotonic())
                elif time.monotonic() - since > PEER_TIMEOUT_S:
                    raise GroupBroken(f"rank {peer} has not beaten for {PEER_TIMEOUT_S:.0f} s")
    except Exception as e:  # the store's connection reset: rank 0 is gone
        if not _stopping.is_set():
            log.error("tensor parallel group broken on rank %d: %s", _rank, e)
            failed.set()


def rank() -> int:
    return _rank


def world_size() -> int:
    return _world_size


def _collective(op, *args) -> None:
    try:
        op(*args)
    except Exception as e:  # gloo and NCCL raise RuntimeError subclasses of their own
        failed.set()
        raise GroupBroken(f"tensor parallel group broken on rank {_rank}: {e}") from e


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Every rank's x summed, in place (the result is bitwise the same on every rank)."""
    if _world_size > 1:
        _collective(dist.all_reduce, x)
    return x


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's x, concatenated along the last dim in rank order."""
    if _world_size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_world_size)]
    _collective(dist.all_gather, parts, x)
    return torch.cat(parts, dim=-1)


def stop_watching() -> None:
    """This rank is leaving on purpose: peers that go away now are no failure."""
    _stopping.set()


def shutdown() -> None:
    _stopping.set()
    if _world_size > 1 and dist.is_initialized() and not failed.is_set():
        dist.destroy_process_group()


def run_local_ranks(world_size: int, target, *args, timeout: float = 300.0) -> list:
    """target(*args) in `world_size` fresh processes on this host, joined in one gloo group, one
    thread each; returns what each rank returned, in rank order (a rank's exception is raised
    here). For tests and benchmarks of the sharded model without gRPC: serving starts its ranks
    as `python -m pagedserve.worker` processes instead. `target` must be importable (a module's function)."""
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    context = multiprocessing.get_context("forkserver")  # forked from a clean process: no threads, no gRPC
    context.set_forkserver_preload(["torch", "pagedserve.worker.model_runner"])
    results = context.Queue()
    procs = [context.Process(target=_local_rank, args=(rank, world_size, address, results, target, args))
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    returned = {}
    try:
        for _ in procs:
            rank, ok, value = results.get(timeout=timeout)
            if not ok:
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{value}")
            returned[rank] = value
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return [returned[rank] for rank in range(world_size)]


def _local_rank(rank, world_size, address, results, target, args) -> None:
    import traceback

    torch.set_num_threads(1)
    try:
        init(rank, world_size, address, torch.device("cpu"))
        results.put((rank, True, target(*args)))
    except BaseException:  # reported to the parent, which raises it
        results.put((rank, False, traceback.format_exc()))
    finally:
        shutdown()
