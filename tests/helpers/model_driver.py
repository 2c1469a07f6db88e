"""The worker's ModelRunner driven by hand (tests/worker/): a tiny random Llama saved as a Hugging
Face directory, and `Driver`, a minimal scheduler that hands out blocks, builds step plans and runs
them, beside transformers' own greedy tokens and logits for the same weights."""
import torch

from pagedserve.v1 import scheduler_pb2, worker_pb2
from pagedserve.scheduler.validation import with_defaults

BLOCK_SIZE = 4  # small, so every sequence spans several blocks
GREEDY = with_defaults(scheduler_pb2.SamplingParams(temperature=0))  # resolved, as the scheduler sends
PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11],
    [3, 4],
    [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35],  # exactly four blocks
    [100, 90, 80, 70, 60, 50, 40, 30, 20, 10, 9],
]
LONG_PROMPT = [(7 * i + 3) % 128 for i in range(23)]


def make_tiny_llama(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


def hf_greedy(hf_model, prompt, n):
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def hf_last_logits(hf_model, tokens):
    with torch.inference_mode():
        return hf_model(torch.tensor([tokens])).logits[0, -1]


class Driver:
    """A minimal scheduler: tracks each sequence's length and blocks, builds plans, runs them."""

    def __init__(self, runner, first_block=0):
        runner.batch.clear()  # each test starts from an empty persistent batch
        self.runner = runner
        self.next_block = first_block
        self.tables: dict[int, list[int]] = {}
        self.unsent: dict[int, list[int]] = {}  # blocks the worker has not been told about yet
        self.computed: dict[int, int] = {}
        self.outputs: dict[int, list[int]] = {}
        self.step_id = 0

    def new(self, seq_id, tokens, num_generated=0, params=GREEDY, table=(), num_computed=0):
        self.tables[seq_id] = list(table)
        self.unsent[seq_id] = list(table)  # prefix-cached blocks travel with the first schedule
        self.computed[seq_id] = num_computed
        self.outputs.setdefault(seq_id, [])
        return worker_pb2.NewSequence(seq_id=seq_id, token_ids=tokens, params=params,
                                      num_computed_tokens=num_computed, num_generated=num_generated)

    def sched(self, seq_id, num_tokens):
        self.computed[seq_id] += num_tokens
        needed = -(-self.computed[seq_id] // BLOCK_SIZE) - len(self.tables[seq_id])
        fresh = list(range(self.next_block, self.next_block + needed))
        self.next_block += needed
        self.tables[seq_id] += fresh
        new_ids, self.unsent[seq_id] = self.unsent[seq_id] + fresh, []
        return worker_pb2.ScheduledSequence(seq_id=seq_id, num_tokens=num_tokens, new_block_ids=new_ids)

    def step(self, new=(), sched=(), freed=()):
        self.step_id += 1
        result = self.runner.execute(worker_pb2.StepPlan(step_id=self.step_id, new_sequences=list(new),
                                                         scheduled=list(sched), freed_seq_ids=list(freed)))
        assert result.error == "", result.error
        assert result.step_id == self.step_id
        for seq_id, token in zip(result.seq_ids, result.token_ids):
            self.outputs[seq_id].append(token)
        return result


def run_prompts(runner, prompts, spec: str | None, num_blocks: int, budget: int, max_tokens: int,
                caching: bool = True, params: scheduler_pb2.SamplingParams | None = None):
    """Every prompt's output (token ids), run together by the real scheduler's policy over the
    ModelRunner `runner`, with `spec` as --speculative-config (None: no speculation); then the
    scheduler and the number of steps. Greedy, ignore_eos, `max_tokens` by default. Asserts no step
    failed and no KV block is left in use."""
    from pagedserve.scheduler.request import SamplingLimits
    from pagedserve.scheduler.scheduler import Scheduler, SchedulerConfig

    runner.batch.clear()
    config = SchedulerConfig(num_blocks=num_blocks, block_size=runner.config.block_size,
                             max_model_len=runner.loaded.max_model_len, max_num_batched_tokens=budget,
                             enable_prefix_caching=caching, speculative_config=spec)
    s = Scheduler(config)
    params = params or with_defaults(scheduler_pb2.SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                  ignore_eos=True))
    limits = SamplingLimits.of(params, frozenset(runner.loaded.eos_token_ids))
    requests = [s.add_request(f"r{i}", p, params, limits) for i, p in enumerate(prompts)]
    steps = 0
    while s.has_work():
        steps += 1
        result = runner.execute(s.schedule())
        assert result.error == "", result.error
        s.update(result)
    assert s.kv.num_used_blocks == 0
    return [r.sequences[0].output_ids() for r in requests], s, steps
