"""LoRA adapters through the real openai SDK on one live `pagedserve serve` (tiny random Llama, two
adapters from --lora-modules in both spellings, run-time updates allowed): `model` picks the
adapter, greedy tokens equal transformers on the merged weights, base and adapters mixed in one
batch; /v1/models lists them under their parent; load, use, unload, then 404; bad adapters
refused with 400 and the server undisturbed; vLLM's lora_requests_info metric."""
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from safetensors.torch import load_file, save_file

from tests.helpers import hf_reference, lora_adapters, tiny_models
from tests.helpers.lora_adapters import ATTENTION, MLP
from tests.helpers.live_stack import scrape
from tests.helpers.stack import run_stack

PROMPT = [5, 17, 300, 999, 42, 7, 8]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    hf = tiny_models.build("llama", root / "base")
    adapters = {"one": lora_adapters.save_adapter(hf, root / "one", seed=1),
                "two": lora_adapters.save_adapter(hf, root / "two", targets=MLP, seed=2, r=2),
                "three": lora_adapters.save_adapter(hf, root / "three", targets=ATTENTION, seed=3)}
    expected = {"base": hf_reference.greedy(root / "base", PROMPT, MAX_TOKENS, ignore_eos=True)}
    for name, path in adapters.items():
        expected[name] = hf_reference.greedy(lora_adapters.save_merged(hf, path, root / f"merged-{name}"), PROMPT,
                                             MAX_TOKENS, ignore_eos=True)
    assert len({tuple(v) for v in expected.values()}) == 4  # each adapter changes the tokens
    two = json.dumps({"name": "two", "path": str(adapters["two"]), "base_model_name": "base"})
    with run_stack(root / "base", "--served-model-name", "base", "--enable-lora", "--lora-modules",
                   f"one={adapters['one']}", two, "--max-loras", "2", "--max-lora-rank", "8",
                   "--max-num-seqs", "8", "--block-size", "4", "--kv-cache-memory-bytes", str(8 << 20),
                   log_dir=root, env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}) as stack:
        yield stack, hf, root, adapters, expected


def complete(stack, model, prompt=PROMPT):
    client = openai.OpenAI(base_url=stack.base_url, api_key="none")
    reply = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=0,
                                      extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    assert reply.model == model
    return [int(t.removeprefix("token_id:")) for t in reply.choices[0].logprobs.tokens]


def test_models_lists_adapters_under_their_parent(served):
    stack, *_ = served
    models = openai.OpenAI(base_url=stack.base_url, api_key="none").models.list().data
    parents = {m.id: m.parent for m in models}
    assert parents == {"base": None, "one": "base", "two": "base"}


def test_model_picks_the_adapter_in_a_mixed_batch(served):
    stack, _, _, _, expected = served
    names = ["base", "one", "two", "one", "base", "two"]
    with ThreadPoolExecutor(len(names)) as pool:
        outputs = list(pool.map(lambda name: complete(stack, name), names))
    assert outputs == [expected[name] for name in names]


def load(stack, name, path):
    return httpx.post(f"{stack.root_url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                      timeout=30)


def test_load_use_unload_then_404(served):
    stack, _, _, adapters, expected = served
    assert load(stack, "three", adapters["three"]).status_code == 200
    assert complete(stack, "three") == expected["three"]
    assert load(stack, "three", adapters["three"]).status_code == 400  # already loaded
    unloaded = httpx.post(f"{stack.root_url}/v1/unload_lora_adapter", json={"lora_name": "three"}, timeout=30)
    assert unloaded.status_code == 200
    with pytest.raises(openai.NotFoundError) as e:
        complete(stack, "three")
    assert e.value.body["code"] == "model_not_found" and "three" in e.value.body["message"]
    gone = httpx.post(f"{stack.root_url}/v1/unload_lora_adapter", json={"lora_name": "three"}, timeout=30)
    assert gone.status_code == 404


def _bad(root, hf, name, config=None, tensors=None):
    path = lora_adapters.save_adapter(hf, root / name)
    if config:
        values = json.loads((path / "adapter_config.json").read_text())
        values.update(config)
        (path / "adapter_config.json").write_text(json.dumps(values))
    if tensors:
        weights = load_file(path / "adapter_model.safetensors")
        tensors(weights)
        save_file(weights, path / "adapter_model.safetensors")
    return path


def test_bad_adapters_are_refused_and_nothing_else_disturbed(served):
    stack, hf, root, _, expected = served
    cases = {
        "rank": (_bad(root, hf, "bad-rank", config={"r": 32}), "rank 32 is above --max-lora-rank 8"),
        "target": (_bad(root, hf, "bad-target", config={"target_modules": ["q_proj", "nope"]}), "['nope']"),
        "missing": (root / "nowhere", "adapter_config.json is missing"),
        "shape": (_bad(root, hf, "bad-shape", tensors=lambda t: t.update(
            {k: v[:, :-1].contiguous() for k, v in t.items() if "lora_A" in k})), "expected [4, "),
    }
    for name, (path, reason) in cases.items():
        reply = load(stack, name, path)
        assert reply.status_code == 400, name
        error = reply.json()["error"]
        assert reason in error["message"] and error["type"] == "invalid_request_error", (name, error)
    models = {m.id for m in openai.OpenAI(base_url=stack.base_url, api_key="none").models.list().data}
    assert models == {"base", "one", "two"}
    assert complete(stack, "one") == expected["one"]


def test_lora_requests_info_metric(served):
    stack, *_ = served
    complete(stack, "one")
    series = [labels for (name, labels) in scrape(stack.root_url) if name == "pagedserve:lora_requests_info"]
    assert series and dict(series[0])["max_lora"] == "2"


def test_grpc_generate_request_names_an_adapter(served):
    from pagedserve.router.lora import LoraRegistry
    from pagedserve.v1 import scheduler_pb2 as pb

    stack, _, root, adapters, expected = served
    adapter = LoraRegistry(root / "base", "base", 8).add("one", str(adapters["one"]))
    request = pb.GenerateRequest(prompt_token_ids=PROMPT, lora_request=adapter.request(), params=pb.SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    tokens = [t for reply in stack.scheduler.Generate(request, timeout=120) for t in reply.token_ids]
    assert tokens == expected["one"]
