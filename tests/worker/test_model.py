"""The worker's ModelRunner against transformers on a tiny random Llama: prefill, decode, chunked
prefill beside decodes, prefix-cached blocks, preemption by recompute, both attention backends,
and invalid plans coming back as errors.

The plans are built by hand by `Driver` (tests/helpers/model_driver.py), a stand-in for the
scheduler that hands out blocks; the `tiny` and `runner` fixtures are in tests/worker/conftest.py.
"""
import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when kernels/ is imported (its @triton.jit runs then).
    os.environ["TRITON_INTERPRET"] = "1"

from pagedserve.v1 import scheduler_pb2, worker_pb2  # noqa: E402
from pagedserve.worker.attention import AttentionMetadata, TorchAttention, TritonAttention  # noqa: E402
from pagedserve.worker.config import WorkerConfig  # noqa: E402
from pagedserve.scheduler.validation import with_defaults  # noqa: E402
from pagedserve.worker.model_runner import ModelRunner  # noqa: E402
from tests.helpers.model_driver import (BLOCK_SIZE, LONG_PROMPT, PROMPTS, Driver,  # noqa: E402
                                        hf_greedy, hf_last_logits)

def test_prefill_then_decode_matches_transformers(runner, tiny):
    d = Driver(runner)
    result = d.step(new=[d.new(i, p) for i, p in enumerate(PROMPTS)],
                    sched=[d.sched(i, len(p)) for i, p in enumerate(PROMPTS)])
    assert list(result.seq_ids) == list(range(len(PROMPTS)))
    for _ in range(8):
        result = d.step(sched=[d.sched(i, 1) for i in range(len(PROMPTS))])
        assert list(result.seq_ids) == list(range(len(PROMPTS)))  # plan order
    for i, prompt in enumerate(PROMPTS):
        assert d.outputs[i] == hf_greedy(tiny[1], prompt, 9), f"prompt {i}"


def test_chunked_prefill_beside_decodes_matches_transformers(runner, tiny):
    d = Driver(runner)
    d.step(new=[d.new(0, PROMPTS[0]), d.new(1, PROMPTS[1])], sched=[d.sched(0, 7), d.sched(1, 2)])
    d.step(new=[d.new(2, LONG_PROMPT)])  # added now, scheduled over the next steps in chunks of 5
    done = 0
    while done < len(LONG_PROMPT):
        chunk = min(5, len(LONG_PROMPT) - done)
        # The chunk goes first in the plan, so the decodes behind it are reordered by the batch.
        result = d.step(sched=[d.sched(2, chunk), d.sched(0, 1), d.sched(1, 1)])
        done += chunk
        assert (2 in result.seq_ids) == (done == len(LONG_PROMPT))  # only the last chunk samples
    for _ in range(4):
        d.step(sched=[d.sched(0, 1), d.sched(2, 1), d.sched(1, 1)])
    assert d.outputs[2] == hf_greedy(tiny[1], LONG_PROMPT, 5)
    for i in (0, 1):
        assert d.outputs[i] == hf_greedy(tiny[1], PROMPTS[i], len(d.outputs[i]))


def test_prefill_logits_match_transformers(runner, tiny):
    d = Driver(runner)
    plan = worker_pb2.StepPlan(step_id=1, new_sequences=[d.new(0, PROMPTS[2]), d.new(1, LONG_PROMPT[:13])],
                               scheduled=[d.sched(0, len(PROMPTS[2])), d.sched(1, 8)])
    result, logits = runner.run_step(plan)
    assert list(result.seq_ids) == [0]
    torch.testing.assert_close(logits[0], hf_last_logits(tiny[1], PROMPTS[2]), atol=1e-4, rtol=0)
    # The rest of a chunked prefill attends to the first chunk through the cache.
    plan = worker_pb2.StepPlan(step_id=2, scheduled=[d.sched(1, 5)])
    _, logits = runner.run_step(plan)
    torch.testing.assert_close(logits[0], hf_last_logits(tiny[1], LONG_PROMPT[:13]), atol=1e-4, rtol=0)


def test_prefix_cached_blocks_are_reused(runner, tiny):
    d = Driver(runner)
    d.step(new=[d.new(0, LONG_PROMPT)], sched=[d.sched(0, len(LONG_PROMPT))])
    # A second sequence shares the first 12 tokens (3 full blocks): it computes only the rest.
    other = LONG_PROMPT[:12] + [1, 2, 3, 4, 5]
    d.step(new=[d.new(1, other, table=d.tables[0][:3], num_computed=12)], sched=[d.sched(1, 5), d.sched(0, 1)])
    for _ in range(3):
        d.step(sched=[d.sched(0, 1), d.sched(1, 1)])
    assert d.outputs[1] == hf_greedy(tiny[1], other, 4)
    assert d.outputs[0] == hf_greedy(tiny[1], LONG_PROMPT, 5)


def test_preempted_sequence_recomputes_and_continues(runner, tiny):
    d = Driver(runner)
    d.step(new=[d.new(0, PROMPTS[0]), d.new(1, PROMPTS[3])], sched=[d.sched(0, 7), d.sched(1, 11)])
    for _ in range(3):
        d.step(sched=[d.sched(0, 1), d.sched(1, 1)])
    # Preempt sequence 0: freed, then back as new with prompt + generated, into other blocks.
    generated = list(d.outputs[0])
    tokens = PROMPTS[0] + generated
    d.next_block = 64
    d.step(freed=[0], sched=[d.sched(1, 1)])
    d.step(new=[d.new(0, tokens, num_generated=len(generated))], sched=[d.sched(0, len(tokens)), d.sched(1, 1)])
    for _ in range(3):
        d.step(sched=[d.sched(0, 1), d.sched(1, 1)])
    assert d.outputs[0] == hf_greedy(tiny[1], PROMPTS[0], 8)
    assert d.outputs[1] == hf_greedy(tiny[1], PROMPTS[3], 9)


def test_batch_rows_grow_past_max_num_seqs_and_are_reused_after_free(tiny):
    """Four sequences in a batch sized for two (its arrays grow), then new sequences in the rows
    that freed ones left, over their stale tokens and block tables: all as transformers."""
    small = ModelRunner(WorkerConfig(model=str(tiny[0]), block_size=BLOCK_SIZE, num_gpu_blocks_override=128,
                                     max_num_seqs=2))
    d = Driver(small)
    d.step(new=[d.new(i, p) for i, p in enumerate(PROMPTS)], sched=[d.sched(i, len(p)) for i, p in enumerate(PROMPTS)])
    for _ in range(2):
        d.step(sched=[d.sched(i, 1) for i in range(4)])
    rows = {i: small.batch.seqs[i].row for i in (2, 3)}
    d.step(freed=[2, 3], new=[d.new(4, PROMPTS[1]), d.new(5, LONG_PROMPT[:6])], sched=[d.sched(4, 2), d.sched(5, 6)])
    assert {small.batch.seqs[i].row for i in (4, 5)} == set(rows.values())
    for _ in range(3):
        d.step(sched=[d.sched(i, 1) for i in (0, 1, 4, 5)])
    assert d.outputs[4] == hf_greedy(tiny[1], PROMPTS[1], 4)
    assert d.outputs[5] == hf_greedy(tiny[1], LONG_PROMPT[:6], 4)
    for i, prompt in ((4, PROMPTS[1]), (5, LONG_PROMPT[:6])):  # nothing of the rows' last owners is left
        seq = small.batch.seqs[i]
        assert (seq.block_table, seq.token_ids, seq.num_computed) == (d.tables[i], prompt + d.outputs[i], d.computed[i])
    for i in (0, 1):
        assert d.outputs[i] == hf_greedy(tiny[1], PROMPTS[i], 6)


@pytest.mark.parametrize("bad", ["unknown sequence", "too many tokens", "missing blocks", "token outside vocab"])
def test_invalid_plan_is_an_error_result_not_an_exception(runner, bad):
    d = Driver(runner)
    d.step(new=[d.new(0, PROMPTS[0])], sched=[d.sched(0, 7)])
    plan = {
        "unknown sequence": worker_pb2.StepPlan(step_id=9, scheduled=[worker_pb2.ScheduledSequence(seq_id=42, num_tokens=1)]),
        "too many tokens": worker_pb2.StepPlan(step_id=9, scheduled=[worker_pb2.ScheduledSequence(seq_id=0, num_tokens=3)]),
        "missing blocks": worker_pb2.StepPlan(step_id=9, new_sequences=[d.new(5, list(range(10)))],
                                              scheduled=[worker_pb2.ScheduledSequence(seq_id=5, num_tokens=10)]),
        "token outside vocab": worker_pb2.StepPlan(step_id=9, new_sequences=[d.new(5, [3, 999])]),
    }[bad]
    result = runner.execute(plan)
    assert result.step_id == 9 and result.error != ""
    # The worker is still alive and sequence 0 still decodes.
    assert d.step(sched=[d.sched(0, 1)]).seq_ids == [0]


def test_a_rejected_plan_changes_nothing(runner, tiny):
    """The first sequence's new block is fine, the second asks for more tokens than it has: the
    plan is refused whole, and the first sequence's table does not keep the block."""
    d = Driver(runner)
    d.step(new=[d.new(0, PROMPTS[0]), d.new(1, PROMPTS[1])], sched=[d.sched(0, 7), d.sched(1, 2)])
    seqs = [runner.batch.seqs[0], runner.batch.seqs[1]]
    before = [(s.block_table, s.num_computed, s.token_ids) for s in seqs]
    plan = worker_pb2.StepPlan(step_id=9, scheduled=[
        worker_pb2.ScheduledSequence(seq_id=0, num_tokens=1, new_block_ids=[120]),
        worker_pb2.ScheduledSequence(seq_id=1, num_tokens=5)])
    assert "sequence 1: cannot compute 5 tokens" in runner.execute(plan).error
    assert [(s.block_table, s.num_computed, s.token_ids) for s in seqs] == before
    for _ in range(2):
        d.step(sched=[d.sched(0, 1), d.sched(1, 1)])
    assert d.outputs[0] == hf_greedy(tiny[1], PROMPTS[0], 3)


def test_logprobs_come_back_for_the_sequences_that_ask(runner, tiny):
    d = Driver(runner)
    asks = with_defaults(scheduler_pb2.SamplingParams(temperature=0, logprobs=3))
    plan = worker_pb2.StepPlan(step_id=1, new_sequences=[d.new(0, PROMPTS[0]), d.new(1, PROMPTS[1], params=asks)],
                               scheduled=[d.sched(0, 7), d.sched(1, 2)])
    result, _ = runner.run_step(plan)
    assert [entry.seq_id for entry in result.logprobs] == [1]
    expected = torch.log_softmax(hf_last_logits(tiny[1], PROMPTS[1]), dim=-1)
    entry = result.logprobs[0].logprob
    assert entry.token_id == result.token_ids[1] == int(expected.argmax())
    assert entry.logprob == pytest.approx(float(expected.max()), abs=1e-4)
    assert [t.token_id for t in entry.top] == expected.topk(3).indices.tolist()


# ----- the two attention backends ------------------------------------------------------------


def _triton_backend():
    if not torch.cuda.is_available():
        from triton.runtime.interpreter import InterpretedFunction

        # Something imported kernels/ before TRITON_INTERPRET was set: reload it under the interpreter.
        for name in ("pagedserve.kernels.kv_write", "pagedserve.kernels.paged_attention"):
            module = importlib.import_module(name)
            if any(hasattr(v, "run") and not isinstance(v, InterpretedFunction) for v in vars(module).values()
                   if type(v).__name__ == "JITFunction"):
                importlib.reload(module)
        importlib.reload(importlib.import_module("pagedserve.kernels"))
    return TritonAttention()


def test_torch_and_triton_backends_agree():
    triton_backend = _triton_backend()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    num_blocks, kv_heads, heads, head_dim = 32, 2, 4, 16
    # Two decodes first, then a prefill from scratch and a chunk after a cached prefix.
    query_lens, seq_lens = [1, 1, 6, 5], [9, 3, 6, 14]
    tables = [[3, 7, 1], [9], [4, 5], [11, 2, 8, 6]]
    starts = [s - q for q, s in zip(query_lens, seq_lens)]
    positions = torch.cat([torch.arange(s, s + q) for s, q in zip(starts, query_lens)])
    owner = torch.repeat_interleave(torch.arange(4), torch.tensor(query_lens))
    padded = torch.tensor([t + [0] * (4 - len(t)) for t in tables], dtype=torch.int32)
    slots = padded[owner, positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE
    qsl = torch.tensor([0, 1, 2, 8, 13], dtype=torch.int32)

    def meta():
        return AttentionMetadata(slot_mapping=slots.to(device), block_tables=padded.to(device),
                                 seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
                                 query_start_loc=qsl.to(device), max_query_len=6, num_decodes=2,
                                 query_lens_cpu=query_lens, seq_lens_cpu=seq_lens, block_size=BLOCK_SIZE)

    T = sum(query_lens)
    q = torch.randn(T, heads, head_dim, device=device)
    k = torch.randn(T, kv_heads, head_dim, device=device)
    v = torch.randn(T, kv_heads, head_dim, device=device)
    cache = torch.randn(2, num_blocks, BLOCK_SIZE, kv_heads, head_dim, device=device)  # the "cached" prefixes
    outs, caches = [], []
    for backend in (TorchAttention(), triton_backend):
        kv = (cache[0].clone(), cache[1].clone())
        outs.append(backend.forward(q, k, v, kv, backend.prepare(meta()), head_dim**-0.5))
        caches.append(kv)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[0][0], caches[1][0])
    torch.testing.assert_close(caches[0][1], caches[1][1])


def test_triton_backend_runner_generates_the_same_tokens(tiny):
    """Block size 4, below the 16 that tl.dot needs: the kernel's tiles span several blocks."""
    _triton_backend()
    # Compiled Triton reads only CUDA tensors; the interpreter only CPU ones.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    triton_runner = ModelRunner(WorkerConfig(model=str(tiny[0]), block_size=BLOCK_SIZE, num_gpu_blocks_override=64,
                                             attention_backend="triton", device=device, dtype="float32"))
    d = Driver(triton_runner)
    d.step(new=[d.new(0, PROMPTS[0]), d.new(1, PROMPTS[1])], sched=[d.sched(0, 7), d.sched(1, 2)])
    for _ in range(2):
        d.step(sched=[d.sched(0, 1), d.sched(1, 1)])
    assert d.outputs[0] == hf_greedy(tiny[1], PROMPTS[0], 3)
    assert d.outputs[1] == hf_greedy(tiny[1], PROMPTS[1], 3)


def _decoding_triton_runner(tiny, device, **flags):
    """A triton runner with three sequences prefilled, and the plan of their next decode step."""
    runner = ModelRunner(WorkerConfig(model=str(tiny[0]), block_size=BLOCK_SIZE, num_gpu_blocks_override=64,
                                      attention_backend="triton", device=device, dtype="float32", **flags))
    d = Driver(runner)
    d.step(new=[d.new(i, PROMPTS[i]) for i in (0, 1, 3)], sched=[d.sched(0, 7), d.sched(1, 2), d.sched(3, 11)])
    return runner, d, [d.sched(i, 1) for i in (0, 1, 3)]


def test_padding_rows_of_a_graph_batch_corrupt_nothing(tiny):
    """CudaGraphRunner.run on the CPU, each "graph" replaying the eager forward pass on the
    persistent buffers: a decode step of 3 sequences runs as 8, its real rows come out as the
    unpadded step's, and the padding rows write only the scratch block."""
    from pagedserve.worker.cuda_graphs import CudaGraphRunner
    from pagedserve.worker.cudagraph_batch import DecodeBuffers

    _triton_backend()
    runner, _, scheduled = _decoding_triton_runner(tiny, "cpu")
    inputs = runner.batch.prepare_inputs(runner.batch.begin_step(scheduled))
    scratch = runner.num_blocks - 1  # no sequence here owns it
    caches = [c for pair in runner.kv_caches for c in pair]
    before = [c.clone() for c in caches]
    graphs = CudaGraphRunner(runner.model, runner.kv_caches, DecodeBuffers.allocate(8, 64, BLOCK_SIZE, scratch, "cpu"),
                             sizes=[1, 8])

    class EagerReplay:  # a captured graph's stand-in: its replay() is the forward pass it would replay
        def __init__(self, size):
            self.size, self.hidden = size, torch.empty(size, tiny[1].config.hidden_size)

        def replay(self):
            b = graphs.buffers
            self.hidden.copy_(runner.model(b.input_ids[:self.size], b.positions[:self.size], runner.kv_caches,
                                           b.meta(self.size)))
    graphs.graphs = {size: (replay, replay.hidden) for size in graphs.sizes for replay in [EagerReplay(size)]}

    with torch.inference_mode():
        eager = runner.model(inputs.input_ids, inputs.positions, runner.kv_caches, inputs.meta)
        eager_caches = [c.clone() for c in caches]
        for cache, old in zip(caches, before):
            cache.copy_(old)
        padded = graphs.run(inputs.input_ids, inputs.positions, inputs.meta)
    assert padded.shape == eager.shape and graphs.buffers.seq_lens[3:8].tolist() == [1] * 5
    torch.testing.assert_close(padded, eager, atol=1e-5, rtol=1e-5)
    for cache, expected, old in zip(caches, eager_caches, before):
        torch.testing.assert_close(cache[:scratch], expected[:scratch], atol=1e-5, rtol=1e-5)
        assert not torch.equal(cache[scratch], old[scratch])  # the padding rows wrote their K/V there


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_and_eager_steps_give_identical_tokens(tiny):
    graphed, d_graph, _ = _decoding_triton_runner(tiny, "cuda", max_num_seqs=8)
    eager, d_eager, _ = _decoding_triton_runner(tiny, "cuda", enforce_eager=True)
    assert list(graphed.worker_info().cudagraph_capture_sizes) == [1, 2, 4, 8]
    assert graphed.num_blocks == eager.num_blocks - 1  # the scratch block left the pool
    for d in (d_graph, d_eager):
        for _ in range(4):
            d.step(sched=[d.sched(i, 1) for i in (0, 1, 3)])
    assert d_graph.outputs == d_eager.outputs
    assert d_graph.outputs[0] == hf_greedy(tiny[1], PROMPTS[0], 5)


@pytest.mark.parametrize("block_size,interpret,message", [
    (12, "1", "power-of-two --block-size"),
    (16, "0", "runs on CUDA tensors"),  # compiled Triton on CPU tensors would fail at the first step
])
def test_triton_backend_is_refused_at_start_up_where_it_cannot_run(monkeypatch, block_size, interpret, message):
    from pagedserve.worker.attention import make_attention_backend

    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    with pytest.raises(ValueError, match=message):
        make_attention_backend("triton", torch.device("cpu"), block_size)


# ----- loading -------------------------------------------------------------------------------


def _copy_model(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads_like_a_single_file(tiny, tmp_path):
    tiny[1].save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    sharded = ModelRunner(WorkerConfig(model=str(tmp_path / "sharded"), block_size=BLOCK_SIZE, num_gpu_blocks_override=16))
    d = Driver(sharded)
    _, logits = sharded.run_step(worker_pb2.StepPlan(step_id=1, new_sequences=[d.new(0, PROMPTS[0])], scheduled=[d.sched(0, 7)]))
    torch.testing.assert_close(logits[0], hf_last_logits(tiny[1], PROMPTS[0]), atol=1e-4, rtol=0)
    info = sharded.worker_info()
    assert (info.num_kv_blocks, info.max_model_len, list(info.eos_token_ids)) == (16, 256, [1])
    assert list(info.cudagraph_capture_sizes) == []  # graphs are off on the CPU; no scratch block taken


def test_dummy_weights_need_no_checkpoint(tiny, tmp_path):
    model_dir = _copy_model(tiny[0], tmp_path / "dummy")
    (model_dir / "model.safetensors").unlink()
    dummy = ModelRunner(WorkerConfig(model=str(model_dir), load_format="dummy", block_size=BLOCK_SIZE,
                                     kv_cache_memory_bytes=1 << 20))
    d = Driver(dummy)
    assert len(d.step(new=[d.new(0, PROMPTS[0])], sched=[d.sched(0, 7)]).token_ids) == 1
    # 1 MiB of 2 layers x 2 heads x 16 dims x 4 tokens in fp32, K and V: 512 blocks (under the cap).
    assert dummy.num_blocks == (1 << 20) // (2 * 2 * BLOCK_SIZE * 2 * 16 * 4)


@pytest.mark.parametrize("damage, message", [
    ("architecture", "'GPTBigCodeForCausalLM' is not supported; supported: .*GPT2LMHeadModel, .*LlamaForCausalLM, "),
    ("shape", "model.safetensors: tensor model.embed_tokens.weight has shape"),
    ("missing", "neither model.safetensors"),
])
def test_load_errors_name_the_problem(tiny, tmp_path, damage, message):
    import json

    from safetensors.torch import load_file, save_file

    model_dir = _copy_model(tiny[0], tmp_path / damage)
    if damage == "architecture":
        config = json.loads((model_dir / "config.json").read_text())
        config["architectures"] = ["GPTBigCodeForCausalLM"]
        (model_dir / "config.json").write_text(json.dumps(config))
    elif damage == "shape":
        tensors = load_file(model_dir / "model.safetensors")
        tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:100].contiguous()
        save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    else:
        (model_dir / "model.safetensors").unlink()
    with pytest.raises(RuntimeError, match=message):
        ModelRunner(WorkerConfig(model=str(model_dir), num_gpu_blocks_override=16))


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=1, vocab_size=128, max_position_embeddings=256, rope_parameters=rope,
                         tie_word_embeddings=True)
    hf_model = LlamaForCausalLM(config).eval()
    hf_model.save_pretrained(tmp_path)
    runner = ModelRunner(WorkerConfig(model=str(tmp_path), block_size=BLOCK_SIZE, num_gpu_blocks_override=64))
    prompt = [(13 * i + 5) % 128 for i in range(150)]  # well past the original context
    d = Driver(runner)
    plan = worker_pb2.StepPlan(step_id=1, new_sequences=[d.new(0, prompt)], scheduled=[d.sched(0, len(prompt))])
    _, logits = runner.run_step(plan)
    torch.testing.assert_close(logits[0], hf_last_logits(hf_model, prompt), atol=1e-4, rtol=0)


def test_triton_backend_runs_gemma2_windows_and_soft_caps(tmp_path):
    """Gemma 2's local layers (window 12) and attention soft-capping through the Triton kernel:
    prompts longer than the window, the same tokens and logits as the torch backend's and
    transformers' tokens."""
    from tests.helpers import hf_reference, tiny_models

    _triton_backend()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tiny_models.build("gemma2", tmp_path)
    prompts = tiny_models.PROMPTS[2:]  # 19 and 37 tokens
    results = [tiny_models.generate_in_process(ModelRunner(tiny_models.runner_config(
        tmp_path, attention_backend=backend, device=device, dtype="float32")), prompts, 3)
        for backend in ("torch", "triton")]
    assert results[0][0] == results[1][0]
    for step_torch, step_triton in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(step_triton.cpu(), step_torch.cpu(), atol=1e-4, rtol=0)
    for prompt, output in zip(prompts, results[1][0]):
        assert output == hf_reference.greedy(tmp_path, prompt, 3, ignore_eos=True)
