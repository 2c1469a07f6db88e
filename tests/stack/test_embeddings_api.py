"""POST /v1/embeddings through the real `openai` SDK against one live `pagedserve serve` of a tiny
random Qwen3 saved as a sentence-transformers checkpoint (last-token pooling, normalised, as
Qwen3-Embedding declares; matryoshka dimensions 16 and 32), under a token budget of 16 so a long
input is prefilled in chunks. Vectors are held to transformers' last hidden state pooled the same
way (float32, within 1e-4 per entry, and 1e-5 through base64); a chat request is refused; the
blocks come back; the metrics count the requests and tokens."""
import base64

import grpc
import numpy as np
import openai
import pytest
import torch
from openai import OpenAI

from pagedserve.v1 import scheduler_pb2 as pb
from tests.helpers import tiny_models
from tests.helpers.live_stack import scrape
from tests.helpers.stack import run_stack

pytestmark = pytest.mark.stack
TOLERANCE = 1e-4
LONG = " ".join(["badakefi lomuso tirepa"] * 12)  # well over the 16-token budget


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen3-embedding")
    hf = tiny_models.build("qwen3", path, is_matryoshka=True, matryoshka_dimensions=[16, 32])
    tiny_models.save_sentence_transformers(path, "lasttoken", normalize=True)
    with run_stack(path, "--max-num-batched-tokens", "16", "--max-model-len", "128",
                   log_dir=tmp_path_factory.mktemp("logs")) as stack:
        yield stack, hf, tiny_models.tokenizer()


@pytest.fixture(scope="module")
def client(served):
    return OpenAI(base_url=served[0].base_url, api_key="none", max_retries=0, timeout=120)


def expected(hf, ids, dimensions=None):
    with torch.inference_mode():
        last = hf.base_model(torch.tensor([ids])).last_hidden_state[0, -1].float()
    return torch.nn.functional.normalize(last[:dimensions] if dimensions else last, dim=-1).numpy()


def model_name(client):
    return client.models.list().data[0].id


def test_one_input_float(served, client):
    _, hf, tok = served
    reply = client.embeddings.create(model=model_name(client), input="badakefi lomuso", encoding_format="float")
    ids = tok.encode("badakefi lomuso")
    assert reply.object == "list" and len(reply.data) == 1 and reply.data[0].index == 0
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == len(ids)
    got = np.asarray(reply.data[0].embedding)
    assert np.abs(got - expected(hf, ids)).max() < TOLERANCE


def test_many_inputs_base64_the_sdk_default(served, client):
    """The SDK asks for base64 unless told otherwise and decodes it; one input is chunked."""
    stack, hf, tok = served
    texts = ["zo", LONG, "tirepa badakefi"]
    reply = client.embeddings.create(model=model_name(client), input=texts)
    assert [d.index for d in reply.data] == [0, 1, 2]
    assert len(tok.encode(LONG)) > 16
    for d, text in zip(reply.data, texts):
        assert np.abs(np.asarray(d.embedding) - expected(hf, tok.encode(text))).max() < TOLERANCE
    assert reply.usage.prompt_tokens == sum(len(tok.encode(t)) for t in texts)
    assert stack.wait_idle().kv_blocks_used == 0


def test_raw_base64_and_token_ids(served, client):
    _, hf, _ = served
    inputs = [[5, 17, 300, 999, 42], [7]]
    raw = client.embeddings.with_raw_response.create(model=model_name(client), input=inputs,
                                                     encoding_format="base64").http_response.json()
    for item, ids in zip(raw["data"], inputs):
        vector = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
        assert np.abs(vector - expected(hf, ids)).max() < TOLERANCE


def test_an_input_may_fill_the_context(served, client):
    """Nothing is generated after an embedding's prompt: max_model_len (128) tokens fit, one more not."""
    _, hf, _ = served
    prompt = [(31 * i + 11) % 1000 for i in range(128)]
    reply = client.embeddings.create(model=model_name(client), input=[prompt], encoding_format="float")
    assert np.abs(np.asarray(reply.data[0].embedding) - expected(hf, prompt)).max() < TOLERANCE
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=model_name(client), input=[prompt + [1]])
    assert e.value.body["param"] == "input" and "maximum context length is 128" in e.value.body["message"]


def test_prefix_cache_hit_gives_the_same_vector(served, client):
    stack, hf, _ = served
    prompt = [(17 * i + 3) % 1000 for i in range(40)]
    before = stack.stats().prefix_cache_hits
    first = client.embeddings.create(model=model_name(client), input=[prompt], encoding_format="float")
    again = client.embeddings.create(model=model_name(client), input=[prompt[:32] + [1, 2]],
                                     encoding_format="float")
    assert stack.stats().prefix_cache_hits - before >= 32
    assert np.abs(np.asarray(first.data[0].embedding) - expected(hf, prompt)).max() < TOLERANCE
    assert np.abs(np.asarray(again.data[0].embedding) - expected(hf, prompt[:32] + [1, 2])).max() < TOLERANCE


def test_dimensions(served, client):
    _, hf, tok = served
    reply = client.embeddings.create(model=model_name(client), input="zo", dimensions=16, encoding_format="float")
    assert len(reply.data[0].embedding) == 16
    assert np.abs(np.asarray(reply.data[0].embedding) - expected(hf, tok.encode("zo"), 16)).max() < TOLERANCE
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=model_name(client), input="zo", dimensions=8)
    assert e.value.body["param"] == "dimensions" and "only supports [16, 32]" in e.value.body["message"]


def test_errors(served, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=model_name(client), input="zo", extra_body={"top_k": 3})
    assert e.value.body["param"] == "top_k"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_name(client), messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["param"] == "model" and "/v1/embeddings" in e.value.body["message"]
    assert served[0].wait_idle().kv_blocks_used == 0


def test_metrics_count_embedding_requests(served, client):
    stack, _, tok = served
    before = scrape(stack.root_url)
    client.embeddings.create(model=model_name(client), input=["zo", "lomuso"], encoding_format="float")
    stack.wait_idle()
    after = scrape(stack.root_url)

    def delta(name, *labels):
        return after[(name, labels)] - before[(name, labels)]
    assert delta("pagedserve:request_success_total", ("finished_reason", "stop")) == 2  # one per input
    assert delta("pagedserve:e2e_request_latency_seconds_count") == 1  # one HTTP request
    assert delta("pagedserve:prompt_tokens_total") == len(tok.encode("zo")) + len(tok.encode("lomuso"))
    assert delta("pagedserve:generation_tokens_total") == 0


def test_public_grpc_generate_with_pooling(served):
    """GenerateRequest.pooling over the scheduler's public API: one message, the vector, no tokens;
    a generation request to this model is refused naming `pooling`."""
    stack, hf, _ = served
    prompt = [5, 17, 300, 999, 42]
    replies = list(stack.scheduler.Generate(pb.GenerateRequest(
        prompt_token_ids=prompt, pooling=pb.PoolingParams(dimensions=32)), timeout=60))
    assert len(replies) == 1 and not replies[0].token_ids
    assert replies[0].finish_reason == pb.FINISH_REASON_STOP and replies[0].prompt_tokens == 5
    assert np.abs(np.asarray(replies[0].embedding) - expected(hf, prompt, 32)).max() < TOLERANCE
    with pytest.raises(grpc.RpcError) as e:
        stack.generate(prompt, 2)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("pooling: this model is served for embeddings")
