"""The mixture-of-experts layer (worker/models/moe.py) against transformers' own modules: the
router's softmax, top-k and renormalisation for each config variant, the grouped experts (an
expert without tokens included), the shared expert and its sigmoid gate, which layers are sparse;
then whole MoE models under the runner's hard cases (chunked prefill beside decodes, prefix-cache
hits, preemption by recompute), greedy tokens identical to transformers."""
import pytest
import torch

from pagedserve.worker.config import WorkerConfig
from pagedserve.worker.model_runner import ModelRunner
from pagedserve.worker.models.moe import SparseMoeBlock, grouped_experts, route, sort_by_expert
from pagedserve.worker.models.qwen2_moe import is_sparse_layer
from pagedserve.worker.models.layers import ActAndMul
from tests.helpers import tiny_models
from tests.helpers.model_driver import BLOCK_SIZE, LONG_PROMPT, PROMPTS, Driver, hf_greedy

MOE = ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3"]


def hf_block(architecture: str, seed: int = 0, **overrides):
    """transformers' sparse MoE block of a tiny config, random weights (the router's too: it
    starts at zeros)."""
    import transformers.models.mixtral.modeling_mixtral as mixtral
    import transformers.models.qwen2_moe.modeling_qwen2_moe as qwen2_moe
    import transformers.models.qwen3_moe.modeling_qwen3_moe as qwen3_moe

    config = tiny_models.hf_config(architecture, **overrides)
    block_class = {"qwen3_moe": qwen3_moe.Qwen3MoeSparseMoeBlock, "qwen2_moe": qwen2_moe.Qwen2MoeSparseMoeBlock,
                   "mixtral": mixtral.MixtralSparseMoeBlock}[architecture]
    torch.manual_seed(seed)
    block = block_class(config).eval()
    for param in block.parameters():
        param.data.normal_(0, 0.2)
    return config, block


def our_block(architecture: str, config, hf) -> SparseMoeBlock:
    """Our block with the same weights: the experts' stacked tensors as transformers holds them in
    memory ([E, 2I, H] gate then up; [E, H, I]), the shared expert's gate and up side by side."""
    from pagedserve.worker.models.llama import LlamaMLP, LlamaVariant

    num_experts = config.num_local_experts if architecture == "mixtral" else config.num_experts
    intermediate = config.intermediate_size if architecture == "mixtral" else config.moe_intermediate_size
    shared = None
    if architecture == "qwen2_moe":
        shared = LlamaMLP(config, LlamaVariant(), config.shared_expert_intermediate_size, reduce=False)
    renormalize = True if architecture == "mixtral" else config.norm_topk_prob
    block = SparseMoeBlock(config, num_experts, config.num_experts_per_tok, intermediate, renormalize,
                           weights_in_model_dtype=architecture != "mixtral", shared_expert=shared).eval()
    with torch.no_grad():
        block.gate.weight.copy_(hf.gate.weight)
        block.experts.gate_up_proj.copy_(hf.experts.gate_up_proj)
        block.experts.down_proj.copy_(hf.experts.down_proj)
        if shared is not None:
            s = hf.shared_expert
            shared.gate_up_proj.weight.copy_(torch.cat([s.gate_proj.weight, s.up_proj.weight]))
            shared.down_proj.weight.copy_(s.down_proj.weight)
            block.shared_expert_gate.weight.copy_(hf.shared_expert_gate.weight)
    return block


@pytest.mark.parametrize("architecture, overrides", [
    ("qwen3_moe", {"norm_topk_prob": True}),
    ("qwen3_moe", {"norm_topk_prob": False}),
    ("qwen2_moe", {"norm_topk_prob": False}),  # with the shared expert and its sigmoid gate
    ("qwen2_moe", {"norm_topk_prob": True, "num_experts_per_tok": 3}),
    ("mixtral", {}),  # always renormalised, weights applied in float32
])
def test_moe_block_matches_transformers(architecture, overrides):
    config, hf = hf_block(architecture, **overrides)
    ours = our_block(architecture, config, hf)
    x = torch.randn(1, 11, config.hidden_size)
    with torch.inference_mode():
        expected = hf(x)[0]
        got = ours(x[0])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture, renormalize", [("qwen2_moe", False), ("qwen2_moe", True), ("mixtral", True)])
def test_router_weights_and_choices_match_transformers(architecture, renormalize):
    config, hf = hf_block(architecture, norm_topk_prob=renormalize)
    x = torch.randn(9, config.hidden_size)
    with torch.inference_mode():
        _, hf_weights, hf_ids = hf.gate(x)
        weights, ids = route(torch.nn.functional.linear(x, hf.gate.weight), config.num_experts_per_tok, renormalize)
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(weights, hf_weights.float(), atol=0, rtol=0)
    sums = weights.sum(-1)
    if renormalize:
        torch.testing.assert_close(sums, torch.ones_like(sums))
    else:
        assert (sums < 1).all()  # the top-k of a softmax over more experts


def test_an_expert_without_tokens_is_skipped_and_the_rest_are_exact():
    config, hf = hf_block("qwen3_moe")
    E = config.num_experts
    x = torch.randn(6, config.hidden_size)
    ids = torch.tensor([[0, 3], [3, 0], [5, 0], [0, 5], [3, 5], [7, 0]])  # experts 1, 2, 4, 6 get nothing
    weights = torch.softmax(torch.randn(6, 2), -1)
    order, counts = sort_by_expert(ids, E)
    assert counts.tolist() == [5, 0, 0, 3, 0, 3, 0, 1]
    assert ids.reshape(-1)[order].tolist() == sorted(ids.reshape(-1).tolist())
    calls = []
    act = ActAndMul("silu")

    def counted(gate_up):
        calls.append(gate_up.shape[0])
        return act(gate_up)

    with torch.inference_mode():
        got = grouped_experts(x, hf.experts.gate_up_proj, hf.experts.down_proj, weights, ids, counted)
        expected = hf.experts(x, ids, weights)
    assert calls == [5, 3, 3, 1]  # one grouped matmul per expert that received tokens, in expert order
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    # Every token to one expert: one matmul over all of them.
    calls.clear()
    one = torch.full((6, 2), 2)
    with torch.inference_mode():
        got = grouped_experts(x, hf.experts.gate_up_proj, hf.experts.down_proj, weights, one, counted)
        expected = hf.experts(x, one, weights)
    assert calls == [12]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_triton_kernel_matches_transformers_experts():
    """kernels/fused_moe.py (under Triton's interpreter here) on transformers' own experts."""
    from pagedserve.kernels.fused_moe import fused_moe

    config, hf = hf_block("qwen3_moe")
    x = torch.randn(9, config.hidden_size)
    ids = torch.tensor([[0, 3], [3, 0], [5, 0], [0, 5], [3, 5], [7, 0], [7, 3], [0, 7], [5, 3]])
    weights = torch.softmax(torch.randn(9, 2), -1)
    with torch.inference_mode():
        expected = hf.experts(x, ids, weights)
        got = fused_moe(x, hf.experts.gate_up_proj, hf.experts.down_proj, weights, ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_model_on_the_triton_kernel_gives_transformers_tokens(tmp_path):
    """The kernel path of the model (CUDA's), forced on the CPU: greedy tokens as transformers'."""
    hf_model = tiny_models.build("mixtral", tmp_path, seed=3)
    runner = ModelRunner(WorkerConfig(model=str(tmp_path), block_size=BLOCK_SIZE, num_gpu_blocks_override=64))
    experts = [m for m in runner.model.modules() if hasattr(m, "use_kernel")]
    assert len(experts) == 2
    for m in experts:
        m.use_kernel = True
    d = Driver(runner)
    d.step(new=[d.new(0, PROMPTS[0]), d.new(1, PROMPTS[3])], sched=[d.sched(0, 7), d.sched(1, 11)])
    for _ in range(3):
        d.step(sched=[d.sched(0, 1), d.sched(1, 1)])
    assert d.outputs[0] == hf_greedy(hf_model, PROMPTS[0], 4)
    assert d.outputs[1] == hf_greedy(hf_model, PROMPTS[3], 4)


@pytest.mark.parametrize("architecture, overrides", [
    ("qwen3_moe", {"num_hidden_layers": 4, "decoder_sparse_step": 2}),
    ("qwen2_moe", {"num_hidden_layers": 4, "mlp_only_layers": [0, 3]}),
    ("qwen2_moe", {"num_hidden_layers": 6, "decoder_sparse_step": 3, "mlp_only_layers": [5]}),
])
def test_sparse_layers_are_the_ones_transformers_builds(architecture, overrides):
    from transformers import AutoModelForCausalLM

    config = tiny_models.hf_config(architecture, **overrides)
    hf = AutoModelForCausalLM.from_config(config)
    expected = [type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in hf.model.layers]
    assert [is_sparse_layer(config, i) for i in range(config.num_hidden_layers)] == expected
    assert True in expected and False in expected


# ----- DeepSeek V3: grouped top-k sigmoid routing, shared experts -----------------------------------


def hf_deepseek_moe(seed=0, **overrides):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = tiny_models.hf_config("deepseek_v3", **overrides)
    torch.manual_seed(seed)
    block = DeepseekV3MoE(config).eval()
    for param in block.parameters():
        param.data.normal_(0, 0.2)
    block.gate.e_score_correction_bias.normal_(0, 0.3)  # a buffer: it moves the choice, not the weights
    return config, block


@pytest.mark.parametrize("overrides", [{}, {"norm_topk_prob": False, "routed_scaling_factor": 1.0},
                                       {"n_group": 2, "topk_group": 1, "num_experts_per_tok": 3}])
def test_deepseek_router_matches_transformers(overrides):
    from pagedserve.worker.models.deepseek_v3 import grouped_topk_route

    config, hf = hf_deepseek_moe(**overrides)
    x = torch.randn(13, config.hidden_size)
    with torch.inference_mode():
        _, hf_weights, hf_ids = hf.gate(x)
        weights, ids = grouped_topk_route(x @ hf.gate.weight.T, hf.gate.e_score_correction_bias, config.n_group,
                                          config.topk_group, config.num_experts_per_tok, config.norm_topk_prob,
                                          config.routed_scaling_factor)
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(weights, hf_weights, atol=0, rtol=0)
    # Only experts of topk_group groups are ever chosen for a token.
    groups = ids // (config.n_routed_experts // config.n_group)
    assert all(len(set(row)) <= config.topk_group for row in groups.tolist())


def test_deepseek_moe_block_matches_transformers():
    from pagedserve.worker.models.deepseek_v3 import DeepseekV3MoE
    from pagedserve.worker.models.llama import LlamaVariant

    config, hf = hf_deepseek_moe()
    ours = DeepseekV3MoE(config, LlamaVariant()).eval()
    with torch.no_grad():
        ours.gate.weight.copy_(hf.gate.weight)
        ours.gate.e_score_correction_bias.copy_(hf.gate.e_score_correction_bias)
        ours.experts.gate_up_proj.copy_(hf.experts.gate_up_proj)
        ours.experts.down_proj.copy_(hf.experts.down_proj)
        s = hf.shared_experts
        ours.shared_experts.gate_up_proj.weight.copy_(torch.cat([s.gate_proj.weight, s.up_proj.weight]))
        ours.shared_experts.down_proj.weight.copy_(s.down_proj.weight)
    x = torch.randn(1, 10, config.hidden_size)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x[0]), hf(x)[0], atol=1e-5, rtol=1e-5)


def test_deepseek_with_a_score_correction_bias_gives_transformers_tokens(tmp_path):
    """The bias is a checkpoint tensor (mlp.gate.e_score_correction_bias): a random one, loaded."""
    hf_model = tiny_models.build("deepseek_v3", tmp_path, seed=4)
    with torch.no_grad():
        hf_model.model.layers[1].mlp.gate.e_score_correction_bias.normal_(0, 0.5)
    hf_model.save_pretrained(tmp_path)
    runner = ModelRunner(WorkerConfig(model=str(tmp_path), block_size=BLOCK_SIZE, num_gpu_blocks_override=64))
    d = Driver(runner)
    d.step(new=[d.new(0, PROMPTS[0]), d.new(1, PROMPTS[3])], sched=[d.sched(0, 7), d.sched(1, 11)])
    for _ in range(4):
        d.step(sched=[d.sched(0, 1), d.sched(1, 1)])
    assert d.outputs[0] == hf_greedy(hf_model, PROMPTS[0], 5)
    assert d.outputs[1] == hf_greedy(hf_model, PROMPTS[3], 5)


def test_deepseek_with_an_unknown_rope_is_refused_with_its_name(tmp_path):
    rope = {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
            "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    tiny_models.build("deepseek_v3", tmp_path, rope_parameters=rope)
    with pytest.raises(RuntimeError, match="rope_type 'longrope' is not supported for DeepseekV3ForCausalLM"):
        ModelRunner(WorkerConfig(model=str(tmp_path), num_gpu_blocks_override=16))


def test_deepseek_fp8_checkpoint_is_refused_with_its_name(tmp_path):
    import json

    tiny_models.build("deepseek_v3", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="quantization_config 'fp8' is not supported: use a bfloat16 checkpoint"):
        ModelRunner(WorkerConfig(model=str(tmp_path), num_gpu_blocks_override=16))


@pytest.mark.parametrize("architecture", ["mixtral", "deepseek_v3"])
def test_moe_models_run_in_bfloat16(tmp_path, architecture):
    """Half precision through the grouped experts and both routers (float32 weights meet bfloat16
    outputs there): every weight in bfloat16, logits finite and float32."""
    from tests.helpers.tiny_models import PROMPTS as TINY_PROMPTS, generate_in_process, runner_config

    tiny_models.build(architecture, tmp_path)
    runner = ModelRunner(runner_config(tmp_path, dtype="bfloat16"))
    assert {p.dtype for p in runner.model.parameters()} == {torch.bfloat16}
    outputs, logits = generate_in_process(runner, TINY_PROMPTS, 2)
    assert all(len(out) == 2 for out in outputs)
    assert logits[0].dtype == torch.float32 and torch.isfinite(torch.stack(logits)).all()


# ----- whole models under the runner's hard cases ------------------------------------------------


@pytest.fixture(scope="module", params=MOE)
def moe(request, tmp_path_factory):
    """(runner, transformers model) of a tiny MoE model."""
    path = tmp_path_factory.mktemp(request.param)
    hf_model = tiny_models.build(request.param, path)
    runner = ModelRunner(WorkerConfig(model=str(path), block_size=BLOCK_SIZE, num_gpu_blocks_override=128))
    return runner, hf_model


def test_moe_chunked_prefill_beside_decodes_matches_transformers(moe):
    runner, hf_model = moe
    d = Driver(runner)
    d.step(new=[d.new(0, PROMPTS[0]), d.new(1, PROMPTS[1])], sched=[d.sched(0, 7), d.sched(1, 2)])
    d.step(new=[d.new(2, LONG_PROMPT)])
    done = 0
    while done < len(LONG_PROMPT):
        chunk = min(5, len(LONG_PROMPT) - done)
        d.step(sched=[d.sched(2, chunk), d.sched(0, 1), d.sched(1, 1)])
        done += chunk
    for _ in range(3):
        d.step(sched=[d.sched(0, 1), d.sched(2, 1), d.sched(1, 1)])
    assert d.outputs[2] == hf_greedy(hf_model, LONG_PROMPT, 4)
    for i in (0, 1):
        assert d.outputs[i] == hf_greedy(hf_model, PROMPTS[i], len(d.outputs[i]))


def test_moe_prefix_cache_hit_and_preemption_match_transformers(moe):
    runner, hf_model = moe
    d = Driver(runner)
    d.step(new=[d.new(0, LONG_PROMPT)], sched=[d.sched(0, len(LONG_PROMPT))])
    other = LONG_PROMPT[:12] + [1, 2, 3, 4, 5]  # 3 cached blocks, 5 tokens computed
    d.step(new=[d.new(1, other, table=d.tables[0][:3], num_computed=12)], sched=[d.sched(1, 5), d.sched(0, 1)])
    d.step(sched=[d.sched(0, 1), d.sched(1, 1)])
    # Preempt sequence 0: freed, then back as new with prompt + generated, into other blocks.
    generated = list(d.outputs[0])
    d.next_block = 64
    d.step(freed=[0], sched=[d.sched(1, 1)])
    tokens = LONG_PROMPT + generated
    d.step(new=[d.new(0, tokens, num_generated=len(generated))], sched=[d.sched(0, len(tokens)), d.sched(1, 1)])
    d.step(sched=[d.sched(0, 1), d.sched(1, 1)])
    assert d.outputs[1] == hf_greedy(hf_model, other, 5)
    assert d.outputs[0] == hf_greedy(hf_model, LONG_PROMPT, 5)
