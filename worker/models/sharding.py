"""Which slice of a checkpoint tensor this rank's parameter holds.

Megatron-style (docs/ARCHITECTURE.md, Tensor parallelism): a projection is split by output features (QKV, gate/up: each rank
computes some heads or some hidden units) or by input features (o_proj, down_proj: each rank
holds the rows that match its heads' outputs and the partial sums are added across ranks); the
embedding and LM head are split over the vocabulary. Layers attach a Shard to each parameter they
split (`module.tp_shards[param_name]`); the loader reads just those ranges from the checkpoint.
A parameter without a Shard is replicated: every rank reads all of it. A fused projection (q, k
and v as one linear) holds several checkpoint tensors, each split on its own: its parameters carry
a Fused, one Shard per section.
"""
from dataclasses import dataclass

from pagedserve.worker import distributed


@dataclass(frozen=True)
class Shard:
    dim: int  # the dim of the parameter (as the model stores it) that is split
    pieces: tuple[tuple[int, int], ...]  # (start, length) ranges of the checkpoint tensor along dim, concatenated
    full: int  # the checkpoint tensor's size along dim
    transposed: bool = False  # the checkpoint stores this 2-D weight as [in, out] (GPT-2's Conv1D)

    @property
    def length(self) -> int:
        """How much of the parameter along dim comes from the checkpoint; the rest is zero padding."""
        return sum(n for _, n in self.pieces)


@dataclass(frozen=True)
class Fused:
    """A parameter that holds several checkpoint tensors side by side along dim 0 (q, k, v;
    gate, up), as one matmul runs them: each section names the checkpoint module its tensor comes
    from (a sibling of the fused module: "q_proj" beside "qkv_proj") and the Shard of it this rank
    holds. The loader reads each tensor's slice straight into its section, so under tensor
    parallelism a rank's fused weight is its q heads, then its k heads, then its v heads."""

    sections: tuple[tuple[str, Shard], ...]  # (checkpoint module name, this rank's slice along dim 0)

    @property
    def length(self) -> int:
        return sum(shard.length for _, shard in self.sections)


def even_split(size: int, what: str) -> tuple[int, int]:
    """(start, length) of this rank's equal part of `size` features."""
    world = distributed.world_size()
    if size % world:
        raise ValueError(f"{what}={size} is not divisible by the tensor parallel size {world}")
    part = size // world
    return distributed.rank() * part, part


def padded_split(size: int) -> tuple[int, int, int]:
    """(start, length, rows per rank) over a vocabulary of `size` tokens: every rank holds
    ceil(size / world) rows, the last ones padded with zeros, so any vocabulary splits."""
    world, rank = distributed.world_size(), distributed.rank()
    per_rank = -(-size // world)
    start = min(rank * per_rank, size)
    return start, min(per_rank, size - start), per_rank


def head_split(num_heads: int, what: str, replicate: bool) -> tuple[int, int]:
    """(first head, count) of this rank's heads. KV heads (`replicate`) may be fewer than the
    ranks: each is then held by world / num_heads consecutive ranks, the ones whose query heads
    read it, so that every rank's cache holds only heads its own queries use."""
    world, rank = distributed.world_size(), distributed.rank()
    if num_heads % world == 0:
        return rank * (num_heads // world), num_heads // world
    if replicate and world % num_heads == 0:
        return rank * num_heads // world, 1
    also = " nor a divisor of it" if replicate else ""
    raise ValueError(f"{what}={num_heads} is neither a multiple of the tensor parallel size {world}{also}")


@dataclass(frozen=True)
class Experts:
    """A parameter that stacks one slice per expert along dim 0 (a mixture-of-experts layer's
    [experts, out, in] weights), where the checkpoint stores each expert apart, as Hugging Face's
    per-expert modules name them: "<module>.<e>.<source>.weight" for expert e and each source
    ("gate_proj" and "up_proj" into gate_up_proj, side by side along the expert's dim 0; or one
    source alone, "down_proj"). Each source's Shard is the slice of it this rank holds, the same
    for every expert: under tensor parallelism a rank holds part of every expert."""

    num_experts: int
    sections: tuple[tuple[str, Shard], ...]  # (checkpoint module name under "<module>.<e>.", this rank's slice)
