"""LoRA under tensor parallelism: each rank holds its slice of A and B (B's rows for an
output-split layer, A's columns for an input-split one) and TP=2 generates what one rank does, in
a mixed batch of the base model and two adapters."""
import pytest

from pagedserve.worker import distributed
from pagedserve.worker.model_runner import ModelRunner
from tests.helpers import lora_adapters, tiny_models
from tests.helpers.lora_adapters import ATTENTION, MLP
from tests.helpers.tiny_models import PROMPTS, runner_config

MAX_TOKENS = 5


@pytest.mark.parametrize("architecture, targets_one, targets_two", [
    ("llama", ATTENTION + MLP, ("k_proj", "o_proj", "down_proj")),
    ("qwen3", ATTENTION + MLP, ("k_proj", "o_proj", "down_proj")),
    ("phi3", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), ("qkv_proj",)),  # q/k/v fused in the checkpoint
])
def test_lora_at_tp2_matches_one_rank(tmp_path, architecture, targets_one, targets_two):
    hf = tiny_models.build(architecture, tmp_path / "base")
    one = lora_adapters.save_adapter(hf, tmp_path / "one", targets=targets_one, seed=1)
    two = lora_adapters.save_adapter(hf, tmp_path / "two", targets=targets_two, seed=2)
    mix = [("one", one), None, ("two", two), ("one", one)]
    expected = lora_adapters.generate(ModelRunner(runner_config(tmp_path / "base", enable_lora=True, max_loras=2)),
                                      PROMPTS, mix, MAX_TOKENS)
    base = lora_adapters.generate(ModelRunner(runner_config(tmp_path / "base")), PROMPTS, [None] * 4, MAX_TOKENS)
    assert expected[1] == base[1] and expected[0] != base[0] and expected[2] != base[2]
    for rank, outputs in enumerate(distributed.run_local_ranks(2, lora_adapters.rank_generate, tmp_path / "base",
                                                               PROMPTS, mix, MAX_TOKENS)):
        assert outputs == expected, f"rank {rank}"
