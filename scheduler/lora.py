"""LoRA adapters as the scheduler sees them: a name and a content hash on each request, nothing
loaded here. It caps the adapters of the running batch at --max-loras (every running sequence is
in each step, so that caps a step's; vLLM's scheduler does the same), and roots each adapter's
block hashes in its content hash, so the prefix cache never serves one adapter's KV to another,
nor to a reloaded adapter of the same name with other weights."""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from pagedserve.v1 import scheduler_pb2 as pb

if TYPE_CHECKING:
    from .config import SchedulerConfig
    from .request import Sequence


def lora_of(request: pb.GenerateRequest, config: SchedulerConfig) -> pb.LoRARequest | None:
    """The request's adapter, None for the base model. Raises InvalidRequest naming
    `lora_request` when LoRA is off or the adapter is incomplete."""
    from .validation import InvalidRequest  # here: validation imports the KV cache manager, which imports this

    if not request.HasField("lora_request"):
        return None
    lora = request.lora_request
    if not config.enable_lora:
        raise InvalidRequest(f"lora_request: adapter {lora.lora_name!r} requested, but LoRA is not "
                             "enabled (start with --enable-lora)")
    if not lora.lora_name or not lora.lora_path:
        raise InvalidRequest("lora_request: lora_name and lora_path are required")
    if request.HasField("pooling"):
        raise InvalidRequest("lora_request: embedding requests run the base model only")
    return lora


def adapter_key(lora: pb.LoRARequest | None) -> tuple[str, str] | None:
    return None if lora is None else (lora.lora_name, lora.content_hash)


def lora_fits(seq: Sequence, running: list[Sequence], max_loras: int) -> bool:
    """Whether seq may join the running batch without more than max_loras adapters in it."""
    key = adapter_key(seq.request.lora)
    if key is None:
        return True
    present = {adapter_key(s.request.lora) for s in running} - {None}
    return key in present or len(present) < max_loras


def lora_root(seq: Sequence) -> bytes:
    """The parent hash of a sequence's first block: empty for the base model (hashes as before),
    else a digest of the adapter's name and content hash."""
    lora = seq.request.lora
    if lora is None:
        return b""
    return hashlib.blake2b(f"lora\0{lora.lora_name}\0{lora.content_hash}".encode(), digest_size=16).digest()


def lora_requests(running, waiting) -> list[pb.LoraRequests]:
    """Requests per adapter in the running batch and in the queue (a request counts as running
    once any of its sequences runs)."""
    counts: dict[str, list[set]] = {}
    for index, seqs in enumerate((running, waiting)):
        for seq in seqs:
            if seq.request.lora is not None:
                counts.setdefault(seq.request.lora.lora_name, [set(), set()])[index].add(seq.request.request_id)
    return [pb.LoraRequests(lora_name=name, running=len(r), waiting=len(w - r))
            for name, (r, w) in sorted(counts.items())]
