"""The public gRPC API as an outside client sees it: stubs generated from protos/ alone, the
example client, reflection and health, GetModelInfo, deadlines and cancellation, API keys."""
from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import grpc
import pytest
import yaml
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase)
from openai import OpenAI
from transformers import AutoTokenizer

from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.router.tokenizer import Tokenizer
from tests.helpers import hf_reference
from tests.helpers.stack import ROOT, run_stack

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"
MAX_TOKENS = 16
SERVICE = "pagedserve.v1.Scheduler"
# The modules the example may import besides the standard library: grpcio, tokenizers, the stubs.
EXAMPLE_IMPORTS = {"grpc", "tokenizers", "tokenizers.decoders", "pagedserve.v1"}


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def expected_ids(model_dir, tokenizer) -> list[int]:
    """transformers' greedy answer to PROMPT, tokenized as /v1/completions does."""
    return hf_reference.greedy(model_dir, tokenizer(PROMPT)["input_ids"], MAX_TOKENS)


def long_request(request_id: str = "") -> pb.GenerateRequest:
    """A generation that would run for minutes on a CPU if nothing stopped it."""
    return pb.GenerateRequest(request_id=request_id, prompt_token_ids=list(range(100, 160)),
                              params=pb.SamplingParams(temperature=0, max_tokens=4000,
                                                       ignore_eos=True))


# ----- the example client, from protos/ alone ----------------------------------------------------

def outside_python(stubs: Path) -> tuple[list[str], dict]:
    """This interpreter as a user's would be: its installed packages (grpcio, tokenizers) and the
    stubs, but not this project, which an editable install's .pth hook would otherwise put on
    sys.path: -S skips site (and so every .pth), PYTHONPATH names site-packages directly."""
    site_dirs = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join([str(stubs), *site_dirs]),
           "PYTHONIOENCODING": "utf-8"}
    return [sys.executable, "-S"], env


def test_example_imports_only_grpc_tokenizers_and_stubs():
    tree = ast.parse((ROOT / "examples" / "grpc_client.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.level == 0}
    outside_stdlib = {m for m in imported if m.split(".")[0] not in sys.stdlib_module_names}
    assert outside_stdlib == EXAMPLE_IMPORTS


def test_example_client_from_protos_alone_equals_transformers_and_completions(
        smol_stack, model_dir, expected_ids, tmp_path):
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    protos = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "protos").rglob("*.proto"))
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    # The command docs/grpc.md gives, run where only protos/ and the example are.
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", "protos",
                    f"--python_out={stubs}", f"--grpc_python_out={stubs}", *protos],
                   cwd=tmp_path, check=True, timeout=60)
    python, env = outside_python(stubs)
    probe = ("import importlib.util as u, pagedserve.v1.scheduler_pb2_grpc as s; "
             "print(s.__file__, [m for m in ('pagedserve.entrypoints', 'router', 'scheduler', 'worker') "
             "if u.find_spec(m)])")
    seen = subprocess.run([*python, "-c", probe], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60, check=True).stdout.split(" ", 1)
    assert seen[0].startswith(str(stubs)) and seen[1].strip() == "[]", seen

    run = subprocess.run(
        [*python, "examples/grpc_client.py", "--target", smol_stack.grpc_address,
         "--model-dir", str(model_dir), "--max-tokens", str(MAX_TOKENS), "--json", PROMPT],
        cwd=tmp_path, env=env, capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr.decode()
    # Bytes, not text mode, which would turn a "\r" of the answer into "\n".
    streamed, last = run.stdout.decode().removesuffix("\n").rsplit("\n", 1)
    result = json.loads(last)

    assert result["token_ids"] == expected_ids
    assert streamed == result["text"]  # printed as it streamed, then the JSON line

    client = OpenAI(base_url=smol_stack.base_url, api_key="none", max_retries=0, timeout=120)
    completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                           temperature=0, logprobs=0).choices[0]
    token_str = Tokenizer(model_dir).token_str
    assert completion.logprobs.tokens == [token_str(t) for t in result["token_ids"]]
    assert completion.text == result["text"]
    assert completion.finish_reason == result["finish_reason"]


def test_docs_python_snippet_prints_the_greedy_answer(smol_stack, tokenizer, expected_ids,
                                                      monkeypatch, capsys):
    docs = (ROOT / "docs" / "grpc.md").read_text()
    snippet = docs.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(ROOT)  # the snippet names the model by its path in a checkout
    assert f"max_tokens={MAX_TOKENS})" in snippet and f'"{PROMPT}"' in snippet
    exec(snippet.replace("localhost:50051", smol_stack.grpc_address), {})
    reason = "FINISH_REASON_STOP" if len(expected_ids) < MAX_TOKENS else "FINISH_REASON_LENGTH"
    text = tokenizer.decode(expected_ids, skip_special_tokens=True)
    assert capsys.readouterr().out == f"{text} {reason}\n"


# ----- discovery: reflection, health, model info, the endpoint --------------------------------

def test_reflection_lists_the_public_and_health_services(smol_stack):
    database = ProtoReflectionDescriptorDatabase(smol_stack.channel)
    assert {SERVICE, "grpc.health.v1.Health"} <= set(database.get_services())
    # A generic tool learns the whole contract from the server: methods and message fields.
    service = DescriptorPool(database).FindServiceByName(SERVICE)
    assert {"Generate", "GenerateStream", "Abort", "GetModelInfo", "GetStats"} <= \
        set(service.methods_by_name)
    generate = service.methods_by_name["Generate"]
    assert generate.server_streaming
    assert "max_tokens" in generate.input_type.fields_by_name["params"].message_type.fields_by_name
    health = health_pb2_grpc.HealthStub(smol_stack.channel)
    for name in ("", SERVICE):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_model_info_matches_config_json(smol_stack, model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    info = smol_stack.scheduler.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.served_model_name == MODEL
    assert info.max_model_len == config["max_position_embeddings"]
    assert info.vocab_size == config["vocab_size"]
    assert list(info.eos_token_ids) == [config["eos_token_id"]]
    assert info.block_size == 16  # --block-size's default
    assert info.tensor_parallel_size == 1
    assert info.num_kv_blocks == smol_stack.stats().kv_blocks_total > 0


def test_launcher_prints_grpc_endpoint_next_to_http_url(smol_stack):
    assert f"at {smol_stack.base_url} (gRPC {smol_stack.grpc_address})" in smol_stack.log()


def test_compose_publishes_the_grpc_port():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    scheduler = compose["services"]["scheduler"]
    port = scheduler["command"][scheduler["command"].index("--port") + 1]
    assert f"{port}:{port}" in scheduler["ports"]


# ----- errors and the end of a request -----------------------------------------------------------

@pytest.mark.parametrize("params, field", [
    (pb.SamplingParams(top_p=0), "top_p"),
    (pb.SamplingParams(allowed_token_ids=[5, 10 ** 6]), "allowed_token_ids"),
    (pb.SamplingParams(bad_words=[pb.TokenBanSequence(token_ids=[5, -1])]), "bad_words"),
    (pb.SamplingParams(bad_words=[pb.TokenBanSequence()]), "bad_words"),
])
def test_invalid_request_names_the_field(smol_stack, params, field):
    request = pb.GenerateRequest(prompt_token_ids=[1, 2], params=params)
    with pytest.raises(grpc.RpcError) as err:
        list(smol_stack.scheduler.Generate(request, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field)


def test_deadline_aborts_the_request_and_frees_its_blocks(smol_stack):
    before = smol_stack.wait_idle()
    request = long_request()
    # Long enough for the request to be queued on a loaded machine, far too short for its tokens.
    replies = smol_stack.scheduler.Generate(request, timeout=5)
    with pytest.raises(grpc.RpcError) as err:
        for _ in replies:
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    after = smol_stack.wait_idle()
    assert after.prompt_tokens_total > before.prompt_tokens_total  # it was queued
    assert after.kv_blocks_used == 0
    assert after.num_requests_running == after.num_requests_waiting == 0
    generated = after.generation_tokens_total - before.generation_tokens_total
    assert generated < request.params.max_tokens  # cut short


def test_cancellation_aborts_a_running_request_and_frees_its_blocks(smol_stack):
    before = smol_stack.wait_idle()
    request = long_request()
    replies = smol_stack.scheduler.Generate(request, timeout=120)
    next(replies)  # it runs: its prompt's K/V sit in the cache
    assert smol_stack.stats().kv_blocks_used > 0
    replies.cancel()
    after = smol_stack.wait_idle()
    assert after.kv_blocks_used == 0
    assert after.num_requests_running == after.num_requests_waiting == 0
    time.sleep(0.5)  # the step loop would be generating for it by now, were it not aborted
    assert smol_stack.stats().generation_tokens_total == after.generation_tokens_total
    assert after.generation_tokens_total - before.generation_tokens_total < request.params.max_tokens


def test_abort_by_request_id_ends_the_stream_with_reason_abort(smol_stack):
    replies = smol_stack.scheduler.Generate(long_request("abort-me"), timeout=120)
    first = next(replies)
    assert first.request_id == "abort-me"
    found = smol_stack.scheduler.Abort(pb.AbortRequest(request_id="abort-me"), timeout=10).found
    rest = list(replies)  # the stream ends with OK
    assert found and rest[-1].finish_reason == pb.FINISH_REASON_ABORT
    assert not smol_stack.scheduler.Abort(pb.AbortRequest(request_id="abort-me"), timeout=10).found
    assert smol_stack.wait_idle().kv_blocks_used == 0


# ----- --api-key ---------------------------------------------------------------------------------

def test_api_key_refuses_calls_without_it_before_queueing_anything(model_dir, tmp_path):
    key = "s3cret"
    with run_stack(model_dir, "--served-model-name", MODEL, "--api-key", key,
                   "--num-gpu-blocks-override", "64", "--max-model-len", "512",
                   log_dir=tmp_path) as stack:
        good = (("authorization", f"Bearer {key}"),)
        request = pb.GenerateRequest(prompt_token_ids=[1, 2, 3],
                                     params=pb.SamplingParams(temperature=0, max_tokens=2))
        refused = [
            lambda md: list(stack.scheduler.Generate(request, metadata=md, timeout=10)),
            lambda md: stack.scheduler.GetModelInfo(pb.GetModelInfoRequest(), metadata=md, timeout=10),
            lambda md: stack.scheduler.Abort(pb.AbortRequest(request_id="x"), metadata=md, timeout=10),
            lambda md: list(stack.scheduler.GenerateStream(
                iter([pb.GenerateStreamRequest(generate=request)]), metadata=md, timeout=10)),
        ]
        for call in refused:
            for metadata in (None, (("authorization", "Bearer wrong"),), (("authorization", key),)):
                with pytest.raises(grpc.RpcError) as err:
                    call(metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "authorization: Bearer" in err.value.details()
        stats = stack.scheduler.GetStats(pb.GetStatsRequest(), metadata=good, timeout=10)
        assert stats.prompt_tokens_total == 0 and stats.num_steps == 0  # nothing was queued
        unknown = stack.channel.unary_unary(f"/{SERVICE}/NoSuchMethod",
                                            request_serializer=bytes, response_deserializer=bytes)
        with pytest.raises(grpc.RpcError) as err:
            unknown(b"", timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # Health stays open (orchestrators probe it); the key opens everything else.
        health = health_pb2_grpc.HealthStub(stack.channel).Check(health_pb2.HealthCheckRequest(),
                                                                 timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        replies = list(stack.scheduler.Generate(request, metadata=good, timeout=60))
        assert sum(len(r.token_ids) for r in replies) == 2
        stats = stack.scheduler.GetStats(pb.GetStatsRequest(), metadata=good, timeout=10)
        assert stats.prompt_tokens_total == 3
        # The router holds the key too: the HTTP API works through it.
        client = OpenAI(base_url=stack.base_url, api_key=key, max_retries=0, timeout=60)
        reply = client.completions.create(model=MODEL, prompt="Hi", max_tokens=1, temperature=0)
        assert reply.usage.completion_tokens == 1
