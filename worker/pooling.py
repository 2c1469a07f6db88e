"""Pooling: an embedding request's prompt hidden states become one vector, on the worker, so only
that vector crosses gRPC (vLLM's pooling runner).

The hidden state of a token is the model's last hidden state after its final norm (`final_hidden`:
what transformers' base model returns as last_hidden_state, and what sentence-transformers and
vLLM pool). A prompt may be computed over several steps (chunked prefill), so each pooling
sequence keeps what its pooling type needs across them: MEAN a running float32 sum of its rows,
CLS the first row, LAST nothing until the chunk that computes its last token. That chunk's step
returns the vector: truncated to `dimensions` (matryoshka), then L2-normalised if asked (vLLM's
order). MEAN and CLS need every row from position 0, so the scheduler gives such a sequence no
prefix-cache hit; the worker refuses a plan that does (PlanError).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from pagedserve.v1 import scheduler_pb2, worker_pb2
from pagedserve.worker.batch import PlanError

LAST, MEAN, CLS = scheduler_pb2.POOLING_TYPE_LAST, scheduler_pb2.POOLING_TYPE_MEAN, scheduler_pb2.POOLING_TYPE_CLS


@dataclasses.dataclass
class PoolState:
    params: scheduler_pb2.PoolingParams  # resolved by the scheduler: every field set
    total: torch.Tensor | None = None    # MEAN: [hidden] float32, the sum of the rows computed so far
    first: torch.Tensor | None = None    # CLS: [hidden] float32, position 0's row


def finish(vector: torch.Tensor, params: scheduler_pb2.PoolingParams) -> torch.Tensor:
    """[hidden] float32 -> [dimensions] float32: truncated first, then normalised (L2, eps 1e-12,
    as torch.nn.functional.normalize), as vLLM's embedding head does."""
    if params.HasField("dimensions") and params.dimensions:
        vector = vector[: params.dimensions]
    if params.normalize:
        vector = torch.nn.functional.normalize(vector, p=2.0, dim=-1)
    return vector


class Poolers:
    """The live pooling sequences of a worker's batch, by seq_id."""

    def __init__(self):
        self.states: dict[int, PoolState] = {}

    def add(self, new: worker_pb2.NewSequence) -> None:
        """Raises PlanError for a pooling type it does not know, or a MEAN/CLS sequence that
        would start past position 0 (its first rows would never be seen)."""
        params = new.pooling
        if params.pooling_type not in (LAST, MEAN, CLS):
            raise PlanError(f"new sequence {new.seq_id}: unknown pooling_type {params.pooling_type}")
        if params.pooling_type != LAST and new.num_computed_tokens:
            raise PlanError(f"new sequence {new.seq_id}: {scheduler_pb2.PoolingType.Name(params.pooling_type)} "
                            f"pooling needs every position, but {new.num_computed_tokens} come from the cache")
        self.states[new.seq_id] = PoolState(params)

    def free(self, seq_ids) -> None:
        for seq_id in seq_ids:
            self.states.pop(seq_id, None)

    def clear(self) -> None:
        self.states.clear()

    def without_pooling(self, inputs, seq_id_of_row: np.ndarray):
        """`inputs` (batch.StepInputs) with the pooling sequences taken out of the sampling rows:
        they never sample."""
        if not self.states:
            return inputs
        seq_ids = seq_id_of_row[inputs.sampling_rows].tolist()
        keep = np.fromiter((s not in self.states for s in seq_ids), dtype=bool, count=len(seq_ids))
        if keep.all():
            return inputs
        kept = np.flatnonzero(keep)
        index = torch.from_numpy(kept).to(inputs.logits_indices.device)
        return dataclasses.replace(inputs, sampling_index=inputs.sampling_index[kept],
                                   logits_indices=inputs.logits_indices[index])

    @torch.inference_mode()
    def step(self, model, hidden: torch.Tensor, seqs, query_lens) -> list[worker_pb2.PooledOutput]:
        """hidden: [T, hidden_size], the step's rows before the final norm, in batch order; `seqs`
        and `query_lens` ([B]) in the same order, read before their num_computed moves on. Returns
        a PooledOutput per pooling sequence whose prompt ends in this step, in batch order."""
        if not self.states:
            return []
        done, row = [], 0
        for seq, n in zip(seqs, np.asarray(query_lens).tolist()):
            state = self.states.get(seq.seq_id)
            if state is not None:
                vector = self.take(model, hidden, state, row, n, seq.num_computed, seq.num_prompt)
                if vector is not None:
                    done.append(worker_pb2.PooledOutput(seq_id=seq.seq_id, embedding=vector.tolist()))
            row += n
        return done

    @staticmethod
    def take(model, hidden: torch.Tensor, state: PoolState, row: int, n: int, start: int,
             num_prompt: int) -> torch.Tensor | None:
        """Folds the rows [row, row + n) (positions [start, start + n)) into `state`; the finished
        vector if they end the prompt, else None."""
        kind, last = state.params.pooling_type, start + n == num_prompt
        if kind == MEAN:
            part = model.final_hidden(hidden[row: row + n]).float().sum(dim=0)
            state.total = part if state.total is None else state.total + part
            return finish(state.total / num_prompt, state.params) if last else None
        if kind == CLS:
            if start == 0:
                state.first = model.final_hidden(hidden[row: row + 1]).float()[0]
            return finish(state.first, state.params) if last else None
        if not last:
            return None
        return finish(model.final_hidden(hidden[row + n - 1: row + n]).float()[0], state.params)
