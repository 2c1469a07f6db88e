"""Every architecture of the registry against transformers, on tiny random models that transformers
builds and saves: logits in float32 within 1e-4 and identical greedy tokens from the worker's
ModelRunner, greedy tokens identical through the whole stack (`pagedserve serve`), the same tokens
from sharded safetensors and .bin checkpoints, dummy weights, dtypes, and load errors that name
the problem before any port opens.

Llama is also served through the stack by test_e2e (SmolLM2), OPT and Qwen2 by
test_tensor_parallel at tensor parallel size 2.
"""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.v1 import worker_pb2
from pagedserve.scheduler import validation
from pagedserve.scheduler.kv_cache_manager import KVCacheManager
from tests.helpers import hf_reference, tiny_models
from tests.helpers.stack import ROOT, generate_all, run_stacks
from tests.helpers.tiny_models import PROMPTS, generate_in_process, runner_config
from pagedserve.worker.model_runner import ModelRunner
from pagedserve.worker.models import supported_architectures

ARCHITECTURES = list(tiny_models.CONFIGS)
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """architecture -> (model directory, the transformers model saved there)."""
    models = {}
    for architecture in ARCHITECTURES:
        path = tmp_path_factory.mktemp(architecture)
        models[architecture] = path, tiny_models.build(architecture, path)
    return models


def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(torch.tensor([tokens])).logits[0, -1]


def check_against_transformers(model_dir, hf_model, **config):
    runner = ModelRunner(runner_config(model_dir, **config))
    outputs, logits = generate_in_process(runner, PROMPTS, MAX_TOKENS)
    for i, prompt in enumerate(PROMPTS):
        assert outputs[i] == hf_reference.greedy(model_dir, prompt, MAX_TOKENS, ignore_eos=True), f"prompt {i}"
        for step in range(MAX_TOKENS):  # the prefill's logits, then every decode's
            expected = hf_logits(hf_model, prompt + outputs[i][:step])
            torch.testing.assert_close(logits[step][i], expected, atol=1e-4, rtol=0)
    return outputs


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_logits_and_greedy_tokens_match_transformers(tiny, architecture):
    check_against_transformers(*tiny[architecture])


@pytest.mark.parametrize("variant, overrides", [
    # opt-350m: LayerNorm after each block, and embeddings narrower than the decoder.
    ("opt", {"do_layer_norm_before": False, "word_embed_proj_dim": 32}),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True, "activation_function": "relu", "n_inner": 96}),
    ("qwen3", {"attention_bias": True, "tie_word_embeddings": True}),
    # Mixture-of-experts: a dense layer among sparse ones, both ways transformers picks them.
    ("qwen3_moe", {"norm_topk_prob": False, "mlp_only_layers": [1]}),
    ("qwen2_moe", {"decoder_sparse_step": 2, "norm_topk_prob": True}),
    # DeepSeek V3 without the q latent, rotary dims not interleaved, V wider than q . k's dims.
    ("deepseek_v3", {"q_lora_rank": None, "rope_interleave": False, "norm_topk_prob": False, "v_head_dim": 32}),
    # YaRN RoPE: DeepSeek V3's (its mscale also scales the softmax) and Qwen's long-context one.
    ("deepseek_v3", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "mscale": 1.0,
                                         "mscale_all_dim": 0.7, "original_max_position_embeddings": 32,
                                         "beta_fast": 32, "beta_slow": 1}}),
    ("qwen3", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                   "original_max_position_embeddings": 64}}),
    # Sliding windows shorter than the prompts, each model's own rule for which layers slide.
    ("mixtral", {"sliding_window": 12}),
    ("phi3", {"sliding_window": 12}),
    ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 12, "max_window_layers": 2}),
    ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 12}),
])
def test_architecture_switches_match_transformers(tmp_path, variant, overrides):
    check_against_transformers(tmp_path, tiny_models.build(variant, tmp_path, seed=1, **overrides))


STACK_ARCHITECTURES = ["mistral", "qwen3", "gpt2", "qwen3_moe"]


@pytest.fixture(scope="module")
def stacks(tiny, tmp_path_factory):
    """architecture -> a `pagedserve serve` of its tiny model; all four start at once (a stack's
    startup is mostly single-threaded imports: one after another they cost the suite ~60 s)."""
    servers = {a: (tiny[a][0], ("--max-model-len", "128")) for a in STACK_ARCHITECTURES}
    with run_stacks(servers, log_dir=tmp_path_factory.mktemp("stacks")) as stacks:
        yield stacks


@pytest.fixture
def stack(stacks, architecture):
    return stacks[architecture]  # a Stack argument: a failing test's report shows its log


@pytest.mark.parametrize("architecture", STACK_ARCHITECTURES)
def test_greedy_tokens_through_the_stack_match_transformers(tiny, stack, architecture):
    model_dir = tiny[architecture][0]
    outputs = generate_all(stack, PROMPTS, 8)
    for prompt, output in zip(PROMPTS, outputs):
        assert output == hf_reference.greedy(model_dir, prompt, 8, ignore_eos=True)
    assert stack.wait_idle().kv_blocks_used == 0


# ----- checkpoint formats ----------------------------------------------------------------------


def test_sharded_safetensors_give_the_same_tokens(tiny, tmp_path):
    hf_model = tiny["qwen3"][1]
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert len(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]) > 20
    assert check_against_transformers(tmp_path, hf_model)


@pytest.mark.parametrize("architecture, tensors_per_file", [("opt", None), ("gpt2", 7)])
def test_bin_checkpoints_with_hub_names_give_the_same_tokens(tiny, tmp_path, architecture, tensors_per_file):
    """Old hub uploads: pytorch_model.bin (one or sharded), tensors named by the bare base model
    (`decoder.layers.0...` for facebook/opt-*, `h.0.attn...` for gpt2)."""
    model_dir, hf_model = tiny[architecture]
    tiny_models.save_bin(hf_model, tmp_path, tensors_per_file, base_names=True)
    assert not list(tmp_path.glob("*.safetensors"))
    runner = ModelRunner(runner_config(tmp_path))
    expected = generate_in_process(ModelRunner(runner_config(model_dir)), PROMPTS, MAX_TOKENS)
    assert generate_in_process(runner, PROMPTS, MAX_TOKENS)[0] == expected[0]


# ----- dummy weights, dtypes, windows, generation_config ----------------------------------------


@pytest.mark.parametrize("architecture", ["opt", "gpt2", "qwen2"])
def test_dummy_weights_need_no_weight_file(tiny, tmp_path, architecture):
    model_dir = tmp_path / architecture
    shutil.copytree(tiny[architecture][0], model_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    runner = ModelRunner(runner_config(model_dir, load_format="dummy"))
    outputs, logits = generate_in_process(runner, PROMPTS, 2)
    assert all(len(out) == 2 for out in outputs) and torch.isfinite(logits[0]).all()
    # Random, not zeros: the rows of the embedding differ.
    embedding = runner.model.input_embeddings().weight
    assert embedding.std() > 1e-4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_flag_sets_the_weights_and_cache_dtype(tiny, dtype):
    runner = ModelRunner(runner_config(tiny["opt"][0], dtype=dtype))
    assert {p.dtype for p in runner.model.parameters()} == {getattr(torch, dtype)}
    assert runner.kv_caches[0][0].dtype == getattr(torch, dtype)
    assert runner.worker_info().dtype == dtype
    outputs, logits = generate_in_process(runner, PROMPTS[:2], 2)
    assert logits[0].dtype == torch.float32 and torch.isfinite(logits[0]).all()


def test_sliding_window_models_serve_their_whole_context(tiny):
    """The window no longer caps max_model_len; the worker tells the scheduler the window it may
    release blocks behind (Mistral: every layer's; Qwen2 with a full layer: none)."""
    info = ModelRunner(runner_config(tiny["mistral_swa"][0])).worker_info()
    assert (info.max_model_len, info.sliding_window) == (2304, 12)
    info = ModelRunner(runner_config(tiny["qwen2_swa"][0])).worker_info()
    assert info.max_model_len == 256 and not info.HasField("sliding_window")


def test_generation_config_sets_defaults_a_request_leaves_unset(tiny, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny["llama"][0], model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 9], "temperature": 0.0,
                                                                   "top_k": 3}))
    runner = ModelRunner(runner_config(model_dir))
    info = runner.worker_info()
    assert list(info.eos_token_ids) == [0, 9]
    assert info.sampling_defaults == pb.SamplingParams(temperature=0.0, top_k=3)
    # The worker reports them; the scheduler resolves each request against them, once ...
    model = pb.ModelInfo(vocab_size=info.vocab_size, max_model_len=info.max_model_len,
                         sampling_defaults=info.sampling_defaults)
    kv = KVCacheManager(info.num_kv_blocks, info.block_size)
    unset, explicit = (validation.check(pb.GenerateRequest(prompt_token_ids=PROMPTS[1], params=params), model, kv)
                       for params in (pb.SamplingParams(), pb.SamplingParams(temperature=0.5)))
    # ... and the worker samples with what it is handed.
    runner.run_step(worker_pb2.StepPlan(step_id=1, new_sequences=[
        worker_pb2.NewSequence(seq_id=0, token_ids=PROMPTS[1], params=unset),
        worker_pb2.NewSequence(seq_id=1, token_ids=PROMPTS[1], params=explicit)]))
    assert (runner.batch.seqs[0].params.temperature, runner.batch.seqs[0].params.top_k) == (0.0, 3)
    assert (runner.batch.seqs[1].params.temperature, runner.batch.seqs[1].params.top_k) == (0.5, 3)


# ----- load errors ---------------------------------------------------------------------------------


def damaged_copy(tiny, tmp_path, damage: str):
    """A copy of a tiny model with one thing wrong, and the words its load error must contain."""
    model_dir = tmp_path / damage
    if damage == "shard missing":
        tiny["qwen2"][1].save_pretrained(model_dir, max_shard_size="40KB")
        victim = sorted(model_dir.glob("model-*.safetensors"))[1]
        victim.unlink()
        return model_dir, f"{victim}: no such file (named by model.safetensors.index.json)"
    shutil.copytree(tiny["gpt2"][0], model_dir)
    if damage == "architecture":
        config = json.loads((model_dir / "config.json").read_text())
        config["architectures"] = ["FalconForCausalLM"]
        (model_dir / "config.json").write_text(json.dumps(config))
        return model_dir, ("'FalconForCausalLM' is not supported; supported: "
                           + ", ".join(supported_architectures()))
    if damage == "shape":
        config = json.loads((model_dir / "config.json").read_text())
        config["n_inner"] = 128  # the checkpoint's MLP is 4 x 64 = 256 wide
        (model_dir / "config.json").write_text(json.dumps(config))
        return model_dir, ("model.safetensors: tensor transformer.h.0.mlp.c_fc.bias has shape [256], "
                           "the model built from config.json expects [128]")
    (model_dir / "model.safetensors").write_bytes(b"not a checkpoint")
    return model_dir, "model.safetensors: not a readable safetensors file"


@pytest.mark.parametrize("damage", ["architecture", "shape", "shard missing", "corrupt"])
def test_load_errors_name_the_file_or_the_architectures(tiny, tmp_path, damage):
    model_dir, message = damaged_copy(tiny, tmp_path, damage)
    with pytest.raises(RuntimeError) as error:
        ModelRunner(runner_config(model_dir))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_serve_stops_with_the_load_error_before_opening_a_port(tiny, tmp_path):
    model_dir, message = damaged_copy(tiny, tmp_path, "architecture")
    proc = subprocess.run([sys.executable, "-m", "pagedserve.entrypoints.cli", "serve", "--model", str(model_dir), "--port", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if message in line]
    assert len(errors) == 1 and "ERROR pagedserve.worker" in errors[0], proc.stderr[-3000:]
    assert "pagedserve: worker 0 exited with code 1 while starting" in proc.stderr
    assert "listening" not in proc.stderr and "started scheduler" not in proc.stderr + proc.stdout
