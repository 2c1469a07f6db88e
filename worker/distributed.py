"""The tensor parallel group: which rank this worker process is, and the two collectives the model
needs (Megatron-style, see DESIGN.md): the sum of partial outputs after each row-split projection
and after the vocabulary-split embedding, and the gather of the logits' vocabulary slices.

One process per rank. Ranks meet at --dist-init-addr, where rank 0 hosts the rendezvous store, so
they may be separate containers or hosts; gloo on CPU, NCCL on CUDA. With one rank nothing here
communicates and the model runs as if this file did not exist.

A collective that fails (a peer crashed: gloo notices its closed socket at once) leaves the group
unusable: `failed` is set, and the worker's main loop exits so that the group can be restarted as a
whole. A peer that hangs without closing its connection is given up after COLLECTIVE_TIMEOUT.
"""
import datetime
import logging
import threading

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)

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


def shutdown() -> None:
    if _world_size > 1 and dist.is_initialized() and not failed.is_set():
        dist.destroy_process_group()
