"""A sliding-window model served by the real scheduler (its KV cache manager releasing the blocks
behind the window) and a real ModelRunner in this process, step by step: chunked prefill, prefix
-cache hits whose early blocks were released, and preemption in a cache too small for the
sequences at once, greedy tokens identical to transformers' (float32), and every block the
sequences held within the window's bound. No processes: the scheduler's plans go straight to
the runner (tests/stack/test_sliding_window_blocks.py drives a real server)."""
import pytest

from pagedserve.scheduler.config import SchedulerConfig
from pagedserve.scheduler.kv_cache_manager import NULL_BLOCK
from pagedserve.scheduler.request import SamplingLimits
from pagedserve.scheduler.scheduler import Scheduler
from pagedserve.scheduler.validation import with_defaults
from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.worker.model_runner import ModelRunner
from tests.helpers import hf_reference, tiny_models
from tests.helpers.scheduler_driver import check_invariants

BLOCK_SIZE, WINDOW, BUDGET = 4, 12, 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mistral-swa")
    tiny_models.build("mistral_swa", path)
    return path


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def gemma_dir(tmp_path_factory, request):
    path = tmp_path_factory.mktemp(request.param)
    tiny_models.build(request.param, path)
    return path


def add(s: Scheduler, request_id: str, prompt: list[int], max_tokens: int):
    """A greedy request, its params resolved as the scheduler's admission resolves them."""
    params = with_defaults(pb.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    return s.add_request(request_id, prompt, params, SamplingLimits.of(params, frozenset({0})))


def serve(model_dir, num_blocks: int, requests: list[tuple[int, list[int], int]], async_scheduling=False):
    """Runs `requests` ((step at which it arrives, prompt, max_tokens)) to the end; returns each
    one's output tokens, the scheduler, the most blocks any sequence held at once, the
    prefix-cache hits found at admissions (ComputedBlocks), and whether any block was released."""
    runner = ModelRunner(tiny_models.runner_config(model_dir, num_gpu_blocks_override=num_blocks))
    info = runner.worker_info()
    s = Scheduler(SchedulerConfig(num_blocks=num_blocks, block_size=BLOCK_SIZE, max_model_len=info.max_model_len,
                                  sliding_window=info.sliding_window if info.HasField("sliding_window") else None,
                                  max_num_batched_tokens=BUDGET,
                                  async_scheduling=async_scheduling))
    added, most_held, step, hits, released = {}, 0, 0, [], False
    find = s.kv.get_computed_blocks

    def recorded(seq, max_num_tokens=None):
        hits.append(find(seq, max_num_tokens))
        return hits[-1]
    s.kv.get_computed_blocks = recorded
    while len(added) < len(requests) or s.has_work():
        for i, (at, prompt, max_tokens) in enumerate(requests):
            if at == step:
                added[i] = add(s, f"r{i}", prompt, max_tokens)
        plan = s.schedule()
        if plan.scheduled or plan.freed_seq_ids:
            result = runner.execute(plan)
            assert result.error == "", result.error
            s.update(result)
        check_invariants(s)
        for seq in s.running:
            most_held = max(most_held, sum(b != NULL_BLOCK for b in s.kv.block_table(seq)))
            released |= NULL_BLOCK in s.kv.block_table(seq)
        step += 1
        assert step < 2000
    return [added[i].sequences[0].token_ids[len(p):] for i, (_, p, _) in enumerate(requests)], s, most_held, hits, released


def prompt(seed: int, n: int) -> list[int]:
    return [(seed * 37 + 11 * i) % tiny_models.VOCAB_SIZE for i in range(n)]


def test_chunked_prefill_prefix_hits_and_preemption_match_transformers(model_dir):
    shared = prompt(1, 41)
    requests = [
        (0, shared, 24),                 # prefilled in chunks of BUDGET, then decodes far past the window
        (0, prompt(2, 30), 20),
        (6, shared + prompt(3, 9), 12),  # arrives once `shared` is cached: hits its window's blocks
        (7, prompt(4, 7), 30),
    ]
    # 9 blocks: one sequence's worth at its peak, so others are preempted and recomputed.
    outputs, s, most_held, hits, released = serve(model_dir, 9, requests)
    assert s.kv.sliding_window == WINDOW
    for (_, p, max_tokens), out in zip(requests, outputs):
        assert out == hf_reference.greedy(model_dir, p, max_tokens, ignore_eos=True)
    assert s.num_preemptions > 0 and released
    assert any(hit.num_skipped > 0 for hit in hits), "a hit whose early blocks were released"
    assert most_held <= s.kv.blocks_for(10_000) == 8  # (WINDOW - 1 + BUDGET) / 4 + 1
    assert s.kv.num_used_blocks == 0


def test_async_scheduling_releases_blocks_a_step_in_flight_still_reads_safely(model_dir):
    """The plan built while a step runs releases the blocks behind its own first token: the step
    in flight may still read them, but the runner finishes it before any later step writes."""
    requests = [(0, prompt(5, 33), 20), (0, prompt(6, 18), 20), (3, prompt(7, 26), 10)]
    outputs, *_ = serve(model_dir, 64, requests, async_scheduling=True)
    for (_, p, max_tokens), out in zip(requests, outputs):
        assert out == hf_reference.greedy(model_dir, p, max_tokens, ignore_eos=True)


def test_interleaved_local_and_global_layers_keep_every_block_and_match_transformers(gemma_dir):
    """Gemma 2 and 3 (local layers with a window of 12, a global one): no block is released, since
    the global layer reads the whole context; chunked prefill, prefix hits and preemption as above."""
    shared = prompt(1, 41)
    requests = [(0, shared, 16), (0, prompt(2, 30), 12), (6, shared + prompt(3, 9), 8), (7, prompt(4, 7), 20)]
    outputs, s, _, hits, released = serve(gemma_dir, 24, requests)
    for (_, p, max_tokens), out in zip(requests, outputs):
        assert out == hf_reference.greedy(gemma_dir, p, max_tokens, ignore_eos=True)
    assert s.kv.sliding_window is None and not released
    assert s.num_preemptions > 0 and any(hit.num_tokens for hit in hits)
