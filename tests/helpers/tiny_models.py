"""Tiny random Hugging Face models, built and saved by transformers itself, for the tests that hold
the worker to transformers' own forward pass: 2 layers, hidden size 64, a vocabulary of about a
thousand tokens. Each directory also gets a small byte-level BPE tokenizer (trained in
milliseconds on generated text), so that the router can serve the model as it would a real one.
"""
from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path

import torch

VOCAB_SIZE = 1000
EOS = "<|endoftext|>"
HIDDEN = 64


@lru_cache(maxsize=1)
def tokenizer(vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE tokenizer with exactly `vocab_size` tokens; id 0 is EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    syllables = [a + b for a in "bcdfghklmnprstvz" for b in "aeiou"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(3000)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(words[i:i + 30]) for i in range(0, len(words), 30)], trainer)
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS)


def hf_config(architecture: str, **overrides):
    """A tiny transformers config of `architecture` (a key of CONFIGS)."""
    import transformers

    class_name, values = CONFIGS[architecture]
    special = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    return getattr(transformers, class_name)(**{**special, **values, **overrides})


_LLAMA_LIKE = dict(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=256)
CONFIGS = {
    "llama": ("LlamaConfig", {**_LLAMA_LIKE, "num_attention_heads": 8}),  # 8 query heads: TP 2 and 4 split them
    "mistral": ("MistralConfig", _LLAMA_LIKE),
    "qwen2": ("Qwen2Config", {**_LLAMA_LIKE, "tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {**_LLAMA_LIKE, "head_dim": 32}),  # head_dim x heads != hidden_size
    "opt": ("OPTConfig", dict(hidden_size=HIDDEN, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                              vocab_size=VOCAB_SIZE, max_position_embeddings=256, word_embed_proj_dim=HIDDEN)),
    "gpt2": ("GPT2Config", dict(n_embd=HIDDEN, n_layer=2, n_head=4, vocab_size=VOCAB_SIZE, n_positions=256)),
}
# Mixture-of-experts: few, narrow experts, top-2 (so a step's few tokens leave some experts idle).
CONFIGS.update({
    "qwen3_moe": ("Qwen3MoeConfig", {**_LLAMA_LIKE, "num_experts": 8, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 32, "norm_topk_prob": True}),
    "qwen2_moe": ("Qwen2MoeConfig", {**_LLAMA_LIKE, "num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48}),
    "mixtral": ("MixtralConfig", {**_LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2,
                                  "intermediate_size": 32}),
})
# Phi-3: fused qkv_proj and gate_up_proj in the checkpoint.
CONFIGS["phi3"] = ("Phi3Config", _LLAMA_LIKE)
# DeepSeek V3: latent attention (q and kv latents of 32, 16 + 8 rotary dims for q . k, 16 for v),
# 8 experts in 4 groups of which 2 are eligible, top-2, a shared expert, the first layer dense.
CONFIGS["deepseek_v3"] = ("DeepseekV3Config", {
    **_LLAMA_LIKE, "num_key_value_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8, "n_group": 4, "topk_group": 2,
    "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 1, "first_k_dense_replace": 1})
# Sliding windows shorter than most test prompts: Mistral's on every layer (the scheduler releases
# blocks behind it; a context long enough for a 2,000-token generation), Qwen2's on its second
# layer only (max_window_layers: the first attends to everything, so every block is kept).
CONFIGS["mistral_swa"] = ("MistralConfig", {**_LLAMA_LIKE, "sliding_window": 12, "max_position_embeddings": 2304})
CONFIGS["qwen2_swa"] = ("Qwen2Config", {**_LLAMA_LIKE, "use_sliding_window": True, "sliding_window": 12,
                                        "max_window_layers": 1})
# Gemma 2 and 3: local (window 12), global, local layers; query_pre_attn_scalar unlike head_dim;
# weights (initializer_range) and caps small enough that soft-capping changes the scores.
_GEMMA = {**_LLAMA_LIKE, "num_hidden_layers": 3, "head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 12,
          "layer_types": ["sliding_attention", "full_attention", "sliding_attention"], "initializer_range": 0.2}
CONFIGS["gemma2"] = ("Gemma2Config", {**_GEMMA, "attn_logit_softcapping": 1.5, "final_logit_softcapping": 3.0})
CONFIGS["gemma3"] = ("Gemma3TextConfig", {**_GEMMA, "final_logit_softcapping": 3.0,
                                          "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                                              "full_attention": {"rope_type": "linear", "rope_theta": 10000.0,
                                                                                 "factor": 4.0}}})


def build(architecture: str, path: Path, seed: int = 0, **overrides):
    """Saves a tiny random model of `architecture` (and the tokenizer) in `path`; returns the
    transformers model, in eval mode, float32."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(architecture, **overrides)).eval()
    if architecture.startswith("gemma"):
        # Gemma's norms multiply by (1 + weight) and start at zeros: random ones test the 1 +.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.uniform_(-0.5, 0.5)
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    return model


def save_bin(model, path: Path, max_tensors_per_file: int | None = None, base_names: bool = False) -> Path:
    """The model as PyTorch .bin files (what older hub uploads hold), config and tokenizer beside.
    `base_names`: tensors named as the bare base model names them (no `model.` / `transformer.`
    prefix, no LM head), like facebook/opt-* and openai-community/gpt2 on the hub."""
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    tokenizer().save_pretrained(path)
    state = (model.base_model if base_names else model).state_dict()
    if max_tensors_per_file is None:
        torch.save(state, path / "pytorch_model.bin")
        return path
    names = list(state)
    chunks = [names[i:i + max_tensors_per_file] for i in range(0, len(names), max_tensors_per_file)]
    weight_map = {}
    for i, chunk in enumerate(chunks, 1):
        file = f"pytorch_model-{i:05d}-of-{len(chunks):05d}.bin"
        torch.save({name: state[name] for name in chunk}, path / file)
        weight_map.update(dict.fromkeys(chunk, file))
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


# ----- driving a worker's ModelRunner over them, without a scheduler ---------------------------

BLOCK_SIZE = 4
BLOCKS_PER_SEQUENCE = 16  # 64 tokens: room for the longest test prompt and its completion
PROMPTS = [  # four lengths: one token, within a block, across blocks, many blocks
    [7],
    [5, 17, 300, 999, 42],
    [(31 * i + 11) % VOCAB_SIZE for i in range(19)],
    [(17 * i + 3) % VOCAB_SIZE for i in range(37)],
]


def generate_in_process(runner, prompts: list[list[int]], max_tokens: int, temperature: float = 0.0):
    """Completions of `prompts` (greedy unless `temperature`), prefilled together in one step then
    decoded together, and the logits of every step ([step][prompt] -> [vocab]): what
    transformers is held to."""
    from pagedserve.v1 import scheduler_pb2, worker_pb2
    from pagedserve.scheduler.validation import with_defaults

    params = with_defaults(scheduler_pb2.SamplingParams(temperature=temperature))  # as the scheduler sends
    new = [worker_pb2.NewSequence(seq_id=i, token_ids=p, params=params) for i, p in enumerate(prompts)]
    scheduled = [worker_pb2.ScheduledSequence(seq_id=i, num_tokens=len(p), new_block_ids=list(
        range(i * BLOCKS_PER_SEQUENCE, (i + 1) * BLOCKS_PER_SEQUENCE))) for i, p in enumerate(prompts)]
    plan = worker_pb2.StepPlan(step_id=1, new_sequences=new, scheduled=scheduled)
    outputs, logits = [[] for _ in prompts], []
    for step in range(max_tokens):
        result, step_logits = runner.run_step(plan)
        for seq_id, token in zip(result.seq_ids, result.token_ids):
            outputs[seq_id].append(token)
        logits.append(step_logits)
        plan = worker_pb2.StepPlan(step_id=step + 2, scheduled=[
            worker_pb2.ScheduledSequence(seq_id=i, num_tokens=1) for i in range(len(prompts))])
    runner.execute(worker_pb2.StepPlan(step_id=max_tokens + 1, freed_seq_ids=range(len(prompts))))
    return outputs, logits


def runner_config(model_dir, **overrides):
    from pagedserve.worker.config import WorkerConfig

    values = dict(model=str(model_dir), block_size=BLOCK_SIZE,
                  num_gpu_blocks_override=BLOCKS_PER_SEQUENCE * len(PROMPTS), num_threads=1)
    return WorkerConfig(**{**values, **overrides})


def rank_generate(model_dir, max_tokens: int, load_format: str = "auto", temperature: float = 0.0):
    """One tensor parallel rank's share of generate_in_process (run in its own process by
    pagedserve.worker.distributed.run_local_ranks): its completions, every step's logits [steps, prompts,
    vocab], the bytes of weights it holds and its KV cache shape."""
    from pagedserve.worker import distributed
    from pagedserve.worker.model_runner import ModelRunner

    config = runner_config(model_dir, rank=distributed.rank(), world_size=distributed.world_size(),
                           load_format=load_format)
    runner = ModelRunner(config)
    outputs, logits = generate_in_process(runner, PROMPTS, max_tokens, temperature)
    return outputs, torch.stack(logits).numpy(), weight_bytes(config), runner.model.kv_cache_shape()


def weight_bytes(config) -> tuple[int, int]:
    """Bytes of the weights a worker holds (before the CPU path prepacks its linears): those
    tensor parallelism splits, and those every rank holds whole (norms, position tables)."""
    from pagedserve.worker.attention import TorchAttention
    from pagedserve.worker.loader import checkpoint_table, load_model

    split = whole = 0
    for data, shard in checkpoint_table(load_model(config, TorchAttention()).model).values():
        size = data.numel() * data.element_size()
        split, whole = (split + size, whole) if shard else (split, whole + size)
    return split, whole


def save_sentence_transformers(path: Path, pooling: str = "lasttoken", normalize: bool = True) -> Path:
    """Marks the model directory `path` as a sentence-transformers checkpoint, as Qwen3-Embedding's
    is: modules.json (Transformer, Pooling, then Normalize if `normalize`), the Pooling module's
    config (`pooling`: lasttoken, mean_tokens or cls_token) and config_sentence_transformers.json."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir(exist_ok=True)
    modes = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
    config = {"word_embedding_dimension": HIDDEN, **{f"pooling_mode_{m}": m == pooling for m in modes}}
    (path / "1_Pooling" / "config.json").write_text(json.dumps(config))
    (path / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {}, "similarity_fn_name": "cosine"}))
    return path
