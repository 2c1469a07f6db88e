"""Sampling parameters resolved once, where a request enters the scheduler: the request's fields,
then the model's defaults (generation_config.json, reported by the workers), then the proto's;
every range refused there by name, from the one table (pagedserve/sampling_ranges.py) that the
router's OpenAI checks read too. The last tests run a real `python -m pagedserve.scheduler` against a fake
worker over gRPC and look at what it hands the worker."""
from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time
from concurrent import futures
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pagedserve.entrypoints.launcher import free_port
from pagedserve.sampling_ranges import INT32_MAX, OPENAI_RANGES, RANGES, Range
from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.v1 import scheduler_pb2_grpc as pbgrpc
from pagedserve.v1 import worker_pb2 as wpb
from pagedserve.v1 import worker_pb2_grpc as wgrpc
from pagedserve.router.errors import APIError
from pagedserve.router.fields import Fields
from pagedserve.router.protocol import sampling_params
from pagedserve.scheduler.kv_cache_manager import KVCacheManager
from pagedserve.scheduler.validation import InvalidRequest, check, check_sampling
from tests.helpers.fake_worker import RecordingWorker
from tests.helpers.stack import ROOT

VOCAB = 1000
MAX_MODEL_LEN = 512
BLOCK_SIZE = 16
NUM_BLOCKS = 64
MODEL_DEFAULTS = pb.SamplingParams(temperature=0.25, top_k=7, repetition_penalty=1.1)
MODEL = pb.ModelInfo(vocab_size=VOCAB, max_model_len=MAX_MODEL_LEN, block_size=BLOCK_SIZE,
                     sampling_defaults=MODEL_DEFAULTS)


def resolve(prompt_len: int = 10, model: pb.ModelInfo = MODEL, num_blocks: int = NUM_BLOCKS,
            **params) -> pb.SamplingParams:
    request = pb.GenerateRequest(prompt_token_ids=[5] * prompt_len, params=pb.SamplingParams(**params))
    return check(request, model, KVCacheManager(num_blocks, BLOCK_SIZE))


# ----- resolution ----------------------------------------------------------------------------------

def test_unset_fields_take_the_models_defaults_then_the_protos():
    assert resolve(max_tokens=5) == pb.SamplingParams(
        temperature=0.25, top_k=7, repetition_penalty=1.1,                  # generation_config.json
        top_p=1.0, min_p=0.0, presence_penalty=0.0, frequency_penalty=0.0,   # scheduler.proto
        min_tokens=0, n=1, max_tokens=5)


def test_the_requests_own_fields_win_and_none_means_none():
    params = resolve(temperature=0.0, top_k=-1, repetition_penalty=1.0, seed=3, logprobs=2,
                     stop_token_ids=[4], max_tokens=5)
    assert (params.temperature, params.top_k, params.repetition_penalty) == (0.0, 0, 1.0)  # -1 is off, as 0
    assert (params.seed, params.logprobs, list(params.stop_token_ids)) == (3, 2, [4])
    assert not resolve(max_tokens=5).HasField("seed") and not resolve(max_tokens=5).HasField("logprobs")


def test_max_tokens_left_out_is_the_room_the_context_leaves():
    assert resolve(prompt_len=100).max_tokens == MAX_MODEL_LEN - 100


# ----- one table of ranges -------------------------------------------------------------------------

def outside(allowed: Range) -> list[float]:
    """Values just past each bound (a bound of INT32_MAX cannot be passed in an int32 field)."""
    values = []
    if allowed.minimum is not None:
        values.append(allowed.minimum - 1)
    if allowed.above is not None:
        values.append(allowed.above)
    if allowed.maximum is not None and allowed.maximum < INT32_MAX:
        values.append(allowed.maximum + 1)
    return values


@pytest.mark.parametrize("name, value", [(name, value) for name, allowed in RANGES.items()
                                         for value in outside(allowed)])
def test_the_scheduler_refuses_every_value_outside_the_table_naming_the_field(name, value):
    with pytest.raises(InvalidRequest, match="^" + re.escape(f"{name}: must be {RANGES[name]}, got")):
        check_sampling(pb.SamplingParams(**{name: value}), VOCAB)


# Body fields the router reads under the proto's names.
SAME_NAME = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
             "repetition_penalty", "n", "min_tokens")


@pytest.mark.parametrize("name, value", [(name, value) for name in SAME_NAME
                                         for value in outside(OPENAI_RANGES[name])])
def test_the_router_refuses_the_same_values_with_openais_400(name, value):
    model = SimpleNamespace(vocab_size=VOCAB, tokenizer=None)
    with pytest.raises(APIError) as err:
        sampling_params(Fields({name: value}), model, None, "max_tokens")
    assert (err.value.status, err.value.param) == (400, name)


def test_openai_is_narrower_only_where_the_table_says():
    narrower = {name for name in RANGES if OPENAI_RANGES[name] != RANGES[name]}
    assert narrower == {"temperature"}
    check_sampling(pb.SamplingParams(temperature=2.5), VOCAB)  # a gRPC client may go past OpenAI's 2


@pytest.mark.parametrize("params, field", [
    ({"temperature": math.nan}, "temperature"),
    ({"min_tokens": 6, "max_tokens": 5}, "min_tokens"),
    ({"logit_bias": {VOCAB: 1.0}}, "logit_bias"),
    ({"allowed_token_ids": [VOCAB]}, "allowed_token_ids"),
    ({"bad_words": [pb.TokenBanSequence()]}, "bad_words"),
    ({"max_tokens": MAX_MODEL_LEN}, "max_tokens"),                  # past the context
    ({"max_tokens": NUM_BLOCKS * BLOCK_SIZE // 2, "num_blocks": NUM_BLOCKS // 4}, "max_tokens"),  # past the cache
])
def test_request_dependent_checks_name_the_field(params, field):
    with pytest.raises(InvalidRequest, match=f"^{field}: "):
        resolve(**params)


def test_a_bad_model_default_is_refused_like_a_bad_request_value():
    model = pb.ModelInfo()
    model.CopyFrom(MODEL)
    model.sampling_defaults.top_p = 0
    with pytest.raises(InvalidRequest, match="^top_p: "):
        resolve(model=model, max_tokens=5)
    assert resolve(model=model, max_tokens=5, top_p=0.5).top_p == 0.5


# ----- through a real scheduler process ------------------------------------------------------------

WORKER_INFO = wpb.WorkerInfo(rank=0, world_size=1, model_path="/fake-model", num_kv_blocks=NUM_BLOCKS,
                             block_size=BLOCK_SIZE, max_model_len=MAX_MODEL_LEN, vocab_size=VOCAB,
                             device="cpu", dtype="float32", sampling_defaults=MODEL_DEFAULTS)


@pytest.fixture(scope="module")
def scheduler():
    worker = RecordingWorker(WORKER_INFO)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    wgrpc.add_WorkerServicer_to_server(worker, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)  # "" is SERVING
    worker_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pagedserve.scheduler", "--worker-addrs", f"127.0.0.1:{worker_port}",
                             "--port", str(port)], cwd=ROOT)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        check_health = health_pb2_grpc.HealthStub(channel).Check
        deadline = time.monotonic() + 60
        while True:
            try:
                if check_health(health_pb2.HealthCheckRequest(), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the scheduler did not start"
            time.sleep(0.2)
        yield SimpleNamespace(stub=pbgrpc.SchedulerStub(channel), worker=worker)
    finally:
        channel.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        server.stop(grace=None)


def generate(stub, prompt: list[int], **params) -> list[int]:
    request = pb.GenerateRequest(prompt_token_ids=prompt, params=pb.SamplingParams(**params))
    return [t for reply in stub.Generate(request, timeout=30) for t in reply.token_ids]


@pytest.mark.stack  # the `scheduler` fixture is a real process
def test_a_grpc_request_without_temperature_reaches_the_worker_with_generation_configs(scheduler):
    prompt = [11, 12, 13]
    assert len(generate(scheduler.stub, prompt, max_tokens=4)) == 4
    [sent] = [new for new in scheduler.worker.new_sequences() if list(new.token_ids) == prompt]
    assert sent.params == resolve(prompt_len=3, max_tokens=4)
    assert (sent.params.temperature, sent.params.top_k) == (pytest.approx(0.25), 7)


@pytest.mark.stack  # the `scheduler` fixture is a real process
def test_the_limits_the_scheduler_acts_on_are_those_it_hands_the_worker(scheduler):
    prompt = [21] * (MAX_MODEL_LEN - 3)  # room for 3 tokens: max_tokens left out means 3
    assert len(generate(scheduler.stub, prompt, temperature=0.5, ignore_eos=True)) == 3
    [sent] = [new for new in scheduler.worker.new_sequences() if list(new.token_ids) == prompt]
    assert (sent.params.max_tokens, sent.params.temperature, sent.params.top_k) == (3, 0.5, 7)


@pytest.mark.stack  # the `scheduler` fixture is a real process
def test_model_info_tells_clients_the_defaults(scheduler):
    assert scheduler.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).sampling_defaults == MODEL_DEFAULTS


@pytest.mark.stack  # the `scheduler` fixture is a real process
def test_a_bad_value_is_refused_by_the_scheduler_before_any_worker_sees_it(scheduler):
    prompt = [31, 32]
    with pytest.raises(grpc.RpcError) as err:
        generate(scheduler.stub, prompt, top_p=0, max_tokens=2)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "top_p: must be in (0, 1], got 0"
    assert not [new for new in scheduler.worker.new_sequences() if list(new.token_ids) == prompt]


def test_the_worker_reports_generation_configs_sampling_fields_and_refuses_unreadable_ones(tmp_path):
    from pagedserve.worker.checkpoint import LoadError
    from pagedserve.worker.loader import sampling_defaults

    config = tmp_path / "generation_config.json"
    config.write_text(json.dumps({"eos_token_id": 2, "temperature": 0.6, "top_p": 0.95, "do_sample": True}))
    assert sampling_defaults(tmp_path) == pb.SamplingParams(temperature=0.6, top_p=0.95)
    config.write_text(json.dumps({"top_k": 2.5}))
    with pytest.raises(LoadError, match="generation_config.json"):
        sampling_defaults(tmp_path)
