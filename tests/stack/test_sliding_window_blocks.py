"""A sliding-window model through the whole stack (`pagedserve serve`): a 300-token generation
holds the window's blocks plus a small constant, read from GetStats while it runs, in a KV cache
of 64 blocks (256 tokens) that could never hold the sequence (320 tokens) whole; its tokens are
transformers', every one of them."""
import threading

from pagedserve.v1 import scheduler_pb2 as pb
from tests.helpers import hf_reference, tiny_models
from tests.helpers.stack import run_stack

BLOCK_SIZE, NUM_BLOCKS, MAX_TOKENS = 4, 64, 300


def test_a_long_generation_holds_a_bounded_number_of_blocks(tmp_path):
    model_dir = tmp_path / "mistral-swa"
    tiny_models.build("mistral_swa", model_dir)
    window = tiny_models.CONFIGS["mistral_swa"][1]["sliding_window"]
    prompt = [(13 * i + 5) % tiny_models.VOCAB_SIZE for i in range(20)]
    flags = ["--block-size", str(BLOCK_SIZE), "--num-gpu-blocks-override", str(NUM_BLOCKS),
             "--max-num-batched-tokens", "32", "--num-threads", "1"]
    with run_stack(model_dir, *flags, log_dir=tmp_path) as stack:
        used, done = [], threading.Event()

        def watch():
            while not done.is_set():
                used.append(stack.stats().kv_blocks_used)
                done.wait(0.01)  # a 300-token generation lasts ~0.7 s on 2 cores

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            params = pb.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
            replies = stack.scheduler.Generate(pb.GenerateRequest(prompt_token_ids=prompt, params=params),
                                               timeout=600)
            tokens = [t for reply in replies for t in reply.token_ids]
        finally:
            done.set()
            watcher.join()
        assert stack.wait_idle().kv_blocks_used == 0
    assert len(tokens) == MAX_TOKENS
    assert sum(1 for n in used if n > 0) >= 10, "GetStats should have been read while it ran"
    # The window's 12 positions span at most 4 blocks of 4; one more while a block fills.
    assert max(used) <= -(-window // BLOCK_SIZE) + 2, max(used)
    # 25 windows past the prompt, in a sequence the whole cache could not hold.
    assert len(prompt) + MAX_TOKENS > NUM_BLOCKS * BLOCK_SIZE
    assert tokens == hf_reference.greedy(model_dir, prompt, MAX_TOKENS, ignore_eos=True)
