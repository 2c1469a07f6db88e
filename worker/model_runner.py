"""One StepPlan in, one StepResult out: update the persistent batch, run every scheduled token
in one varlen forward pass, sample for the sequences that reached the end of their tokens.
"""
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from pagedserve.v1 import worker_pb2
from pagedserve.worker import prompt_logprobs
from pagedserve.worker import rejection_sampler
from pagedserve.worker.attention import make_attention_backend
from pagedserve.worker.batch import PersistentBatch, PlanError, blocks_per_seq
from pagedserve.worker.config import WorkerConfig
from pagedserve.worker.cpu.host_memory import keep_freed_memory
from pagedserve.worker.cpu.kernel_choices import recorded
from pagedserve.worker.cpu.linear import prepare_linears
from pagedserve.worker.cuda_graphs import CudaGraphRunner, capture_or_eager, graphs_off_reason
from pagedserve.worker.cudagraph_batch import DecodeBuffers, capture_sizes, reserve_scratch_block
from pagedserve.worker.draft_model import DraftModel, draft_model_dir
from pagedserve.worker.kv_cache import allocate_kv_cache, choose_num_blocks
from pagedserve.worker.loader import load_model, tokenizer_dir
from pagedserve.worker.lora import lora_targets
from pagedserve.worker.lora_manager import LoraManager, LoraSpec
from pagedserve.worker.pooling import Poolers
from pagedserve.worker.pooling_config import resolve_runner
from pagedserve.worker.sampler import Sampler, SamplerOutput
from pagedserve.worker.structured_output import Grammars, advance

log = logging.getLogger(__name__)


def openmp_wait() -> str:
    """How libgomp's threads wait between parallel regions, as the environment set it."""
    policy, spins = os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT")
    if spins is not None:
        return f"spin {spins} times, then sleep" + (f" (OMP_WAIT_POLICY={policy})" if policy else "")
    return policy or "libgomp's default"


class ModelRunner:
    def __init__(self, config: WorkerConfig):
        self.config = config
        torch.set_num_threads(config.num_threads or len(os.sched_getaffinity(0)))
        torch.manual_seed(config.seed)
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda, but torch sees no CUDA device (use --device cpu)")
        self.backend = make_attention_backend(config.attention_backend, self.device, config.block_size)
        self.loaded = load_model(config, self.backend)
        self.model = self.loaded.model
        targets = lora_targets(self.model) if config.enable_lora else {}  # before the CPU path swaps the linears
        if self.device.type == "cpu":
            log.info("%s", prepare_linears(self.model))
            log.info("kernel choices (cached per CPU, cpu/kernel_choices.py): %s", "; ".join(recorded(self.model)))
            log.info("%s", keep_freed_memory())
        self.lora = (LoraManager(self.model, targets, config.max_loras, config.max_lora_rank,
                                 config.max_cpu_loras or config.max_loras, self.loaded.dtype, self.device,
                                 getattr(self.model, "checkpoint_prefix", ""))
                     if config.enable_lora else None)
        draft_dir = draft_model_dir(config.speculative_config)
        self.draft = (DraftModel(config, draft_dir, self.loaded.vocab_size, self.loaded.max_model_len,
                                 self.loaded.dtype, self.backend)
                      if draft_dir else None)
        if self.draft is not None and self.device.type == "cpu":
            log.info("draft model: %s", prepare_linears(self.draft.model))
        shape = self.model.kv_cache_shape()
        draft_bytes = self.draft.bytes_per_block(config.block_size) if self.draft is not None else 0
        self.num_blocks = choose_num_blocks(config, shape, self.loaded.dtype, self.device, self.loaded.max_model_len,
                                            extra_bytes_per_block=draft_bytes)
        self.kv_caches = allocate_kv_cache(self.num_blocks, config.block_size, shape, self.loaded.dtype, self.device)
        if self.draft is not None:  # indexed by the target's block tables: as many blocks
            self.draft.allocate_cache(self.num_blocks, config.block_size)
        self.graphs = self.start_cuda_graphs()
        self.batch = PersistentBatch(config.block_size, self.num_blocks, self.loaded.max_model_len,
                                     self.loaded.vocab_size, config.max_num_seqs, self.device)
        self.sampler = Sampler(self.loaded.vocab_size, self.loaded.eos_token_ids, config.seed, self.device)
        self.grammars = Grammars(str(tokenizer_dir(config)), self.loaded.vocab_size, self.loaded.eos_token_ids)
        self.pooling = resolve_runner(tokenizer_dir(config), config.runner, config.pooler_config,
                                      self.loaded.hf_config)
        self.poolers = Poolers()  # the live sequences of embedding requests
        log.info("%s loaded from %s: %s on %s, %s attention, %d threads (OpenMP wait policy %s)",
                 self.loaded.architecture, config.model, self.loaded.dtype, self.device, self.backend.name,
                 torch.get_num_threads(), openmp_wait())

    def start_cuda_graphs(self) -> CudaGraphRunner | None:
        """Capture decode graphs unless graphs_off_reason says no; their padding rows take the
        cache's last block, which then leaves the scheduler's pool (self.num_blocks shrinks)."""
        reason = graphs_off_reason(self.config, self.device, self.backend.name)
        if reason is not None:
            log.info("CUDA graphs off: %s", reason)
            return None
        usable, scratch = reserve_scratch_block(self.num_blocks)
        sizes = capture_sizes(self.config.max_cudagraph_capture_size, self.config.max_num_seqs)
        max_blocks = blocks_per_seq(self.loaded.max_model_len, self.config.block_size)

        def make_runner():
            buffers = DecodeBuffers.allocate(sizes[-1], max_blocks, self.config.block_size, scratch, self.device)
            return CudaGraphRunner(self.model, self.kv_caches, buffers, sizes)
        runner = capture_or_eager(make_runner)
        if runner is not None:
            self.num_blocks = usable
        return runner

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
        """Hidden states [T, hidden]: replayed from a CUDA graph where one serves the step (none
        where LoRA tokens are in it: graphs are captured with the LoRA hooks idle)."""
        if self.graphs is not None and (self.lora is None or self.lora.groups is None):
            hidden = self.graphs.run(input_ids, positions, meta)
            if hidden is not None:
                return hidden
        return self.model(input_ids, positions, self.kv_caches, meta)

    def worker_info(self) -> worker_pb2.WorkerInfo:
        return worker_pb2.WorkerInfo(
            rank=self.config.rank,
            world_size=self.config.world_size,
            model_path=str(tokenizer_dir(self.config)),  # the router's tokenizer (a GGUF file holds none)
            num_kv_blocks=self.num_blocks,
            block_size=self.config.block_size,
            max_model_len=self.loaded.max_model_len,
            vocab_size=self.loaded.vocab_size,
            eos_token_ids=self.loaded.eos_token_ids,
            device=str(self.device),
            dtype=str(self.loaded.dtype).removeprefix("torch."),
            cudagraph_capture_sizes=self.graphs.sizes if self.graphs is not None else [],
            sampling_defaults=self.loaded.sampling_defaults,
            runner=self.pooling.runner,
            pooler=self.pooling.pooler,
            is_matryoshka=self.pooling.is_matryoshka,
            matryoshka_dimensions=self.pooling.matryoshka_dimensions,
            hidden_size=self.model.input_embeddings().embedding_dim,
            sliding_window=self.loaded.sliding_window,
            kernel_choices=recorded(self.model),
        )

    def execute(self, plan: worker_pb2.StepPlan) -> worker_pb2.StepResult:
        """Never raises: a step that fails comes back with `error` set, and the worker goes on."""
        try:
            return self.run_step(plan)[0]
        except PlanError as e:
            log.warning("step %d rejected: %s", plan.step_id, e)
            return worker_pb2.StepResult(step_id=plan.step_id, error=f"invalid plan: {e}")
        except Exception as e:
            log.exception("step %d failed", plan.step_id)
            return worker_pb2.StepResult(step_id=plan.step_id, error=f"{type(e).__name__}: {e}")

    @torch.inference_mode()
    def run_step(self, plan: worker_pb2.StepPlan) -> tuple[worker_pb2.StepResult, torch.Tensor | None]:
        """The step, raising on failure; also returns the sampled rows' logits (in result order),
        which tests compare with transformers."""
        self.batch.free(plan.freed_seq_ids)
        self.poolers.free(plan.freed_seq_ids)
        if self.draft is not None:
            self.draft.free(plan.freed_seq_ids)
        for new in plan.new_sequences:
            if new.HasField("pooling"):
                self.poolers.add(new)
            seq = self.batch.add(new)
            if self.draft is not None:
                self.draft.add(new.seq_id)
            if new.HasField("lora_request"):
                seq.lora = self._lora_spec(new.lora_request)
            if new.params.HasField("structured_outputs"):
                seq.grammar = self.grammars.matcher(new.params.structured_outputs, seq.token_ids[seq.num_prompt:])
        if not plan.scheduled:
            return worker_pb2.StepResult(step_id=plan.step_id), None
        drafts = rejection_sampler.append_drafts(self.batch, plan.scheduled)  # speculative decoding
        try:
            step = self.batch.begin_step(plan.scheduled)
        except PlanError:
            rejection_sampler.drop_drafts(self.batch, drafts)
            raise
        if self.draft is not None and drafts:  # over the placeholders, with the step's blocks in the tables
            self.draft.propose(self.batch, step, drafts, self.sampler, skip=self.poolers.states.keys())

        started, cpu_started = time.perf_counter(), time.process_time()
        inputs = self.poolers.without_pooling(self.batch.prepare_inputs(step), self.batch.seq_id_of_row)
        meta = self.backend.prepare(inputs.meta, self.loaded.dtype)
        if self.lora is not None:
            self.lora.begin_step([s.lora for s in self.batch.seqs_at(inputs.rows)], inputs.meta.query_lens_cpu)
        try:
            hidden = self.forward(inputs.input_ids, inputs.positions, meta)
        finally:
            if self.lora is not None:
                self.lora.end_step()
        sampling = self.batch.seqs_at(inputs.sampling_rows)
        verification = None
        if sampling and drafts:
            verification = rejection_sampler.expand(self.batch, sampling, inputs.sampling_rows,
                                                    inputs.logits_indices.cpu().numpy(), drafts)
            index = torch.from_numpy(verification.logits_indices).to(hidden.device)
            all_logits = self.model.compute_logits(hidden.index_select(0, index))
            drawn = self.sampler(all_logits, verification.positions)
            by_q = (rejection_sampler.verify_sampled(verification, all_logits, self.sampler, self.draft.proposals())
                    if self.draft is not None else None)  # drafts drawn from the draft's q
            sampled = rejection_sampler.verify(verification, drawn, by_q)
            finals = [first + a for (first, _, _), a in zip(verification.spans, verification.accepted)]
            logits = all_logits[finals]
        elif sampling:
            # Every row samples in a pure decode step: no gather (logits_indices is 0..T-1).
            rows = hidden if len(sampling) == len(hidden) else hidden.index_select(0, inputs.logits_indices)
            logits = self.model.compute_logits(rows)
            sampled = self.sampler(logits, sampling)  # returns Python ints: the device has synced
        else:  # only prefill chunks that do not reach their end
            logits, sampled = None, SamplerOutput([], [])
        prompt_chunks = prompt_logprobs.compute(self.model, hidden, self.batch.seqs_at(inputs.rows),
                                                inputs.meta.query_lens_cpu)
        pooled = (self.poolers.step(self.model, hidden, self.batch.seqs_at(inputs.rows), inputs.meta.query_lens_cpu)
                  if self.poolers.states else [])
        elapsed = time.perf_counter() - started
        if log.isEnabledFor(logging.DEBUG):  # cores busy below the thread count: the step waited on something
            log.debug("step %d: %d tokens in %.1f ms, %.2f cores busy", plan.step_id, len(inputs.input_ids),
                      elapsed * 1e3, (time.process_time() - cpu_started) / elapsed)

        if verification is not None:
            rejection_sampler.commit(self.batch, verification)
            if self.draft is not None:
                self.draft.accepted(self.batch, drafts, {row: a for (_, row, d), a in
                                                         zip(verification.spans, verification.accepted) if d})
        self.batch.finish_step(inputs, sampled.token_ids)
        advance(sampling, sampled.token_ids)
        result, logits = self._result(plan.step_id, inputs, sampled, elapsed, prompt_chunks, logits)
        if verification is not None:
            place = dict(zip(inputs.rows.tolist(), inputs.plan_index.tolist()))
            result.accepted.extend(rejection_sampler.accepted_drafts(self.batch, verification, drawn, place))
        if pooled:  # batch order to plan order
            place = dict(zip(self.batch.seq_id_of_row[inputs.rows].tolist(), inputs.plan_index.tolist()))
            result.pooled.extend(sorted(pooled, key=lambda p: place[p.seq_id]))
        return result, logits

    def _lora_spec(self, request) -> LoraSpec:
        if self.lora is None:
            raise PlanError(f"LoRA adapter {request.lora_name!r} requested, but the worker runs without --enable-lora")
        return LoraSpec(request.lora_name, request.lora_path, request.content_hash)

    def _result(self, step_id: int, inputs, sampled: SamplerOutput, elapsed: float, prompt_chunks,
                logits: torch.Tensor | None) -> tuple[worker_pb2.StepResult, torch.Tensor | None]:
        """The StepResult in plan order (the batch ran decodes first), built from whole lists."""
        order = np.argsort(inputs.plan_index[inputs.sampling_index], kind="stable")
        reordered = bool((order != np.arange(len(order))).any())
        seq_ids = self.batch.seq_id_of_row[inputs.sampling_rows[order]].tolist()
        token_ids = np.asarray(sampled.token_ids, dtype=np.int64)[order].tolist() if reordered else sampled.token_ids
        logprobs = [sampled.logprobs[j] for j in order.tolist()] if reordered else sampled.logprobs
        result = worker_pb2.StepResult(
            step_id=step_id, seq_ids=seq_ids, token_ids=token_ids, forward_seconds=elapsed,
            logprobs=[worker_pb2.SequenceLogprob(seq_id=seq_id, logprob=entry)
                      for seq_id, entry in zip(seq_ids, logprobs) if entry is not None],
        )
        if prompt_chunks:  # batch order to plan order
            place = dict(zip(self.batch.seq_id_of_row[inputs.rows].tolist(), inputs.plan_index.tolist()))
            result.prompt_logprobs.extend(sorted(prompt_chunks, key=lambda c: place[c.seq_id]))
        if logits is not None and reordered:  # a copy of [S, vocab]: only when reordered
            logits = logits[torch.from_numpy(order)]
        return result, logits
