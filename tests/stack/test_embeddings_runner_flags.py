"""`pagedserve serve --runner pooling --pooler-config ...` on a plain tiny Llama checkpoint (no
sentence-transformers files): the flags reach the worker, the vectors are transformers' mean
pooled last hidden state, unnormalised, and `dimensions` is refused for a model without matryoshka
representations. And the shared SmolLM2 server, a generating model, refuses /v1/embeddings."""
import numpy as np
import openai
import pytest
import torch
from openai import OpenAI

from tests.helpers import tiny_models
from tests.helpers.stack import run_stack

pytestmark = pytest.mark.stack
TOLERANCE = 1e-4  # float32: max absolute difference per entry


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-mean")
    hf = tiny_models.build("llama", path)
    with run_stack(path, "--runner", "pooling", "--pooler-config", '{"pooling_type": "MEAN", "normalize": false}',
                   "--max-num-batched-tokens", "16", log_dir=tmp_path_factory.mktemp("logs")) as stack:
        yield OpenAI(base_url=stack.base_url, api_key="none", max_retries=0, timeout=120), hf


def test_mean_pooling_unnormalised_from_the_flags(served):
    client, hf = served
    prompts = [[(7 * i + 3) % 1000 for i in range(40)], [5, 17]]
    reply = client.embeddings.create(model=client.models.list().data[0].id, input=prompts)
    for item, prompt in zip(reply.data, prompts):
        with torch.inference_mode():
            mean = hf.base_model(torch.tensor([prompt])).last_hidden_state[0].float().mean(dim=0).numpy()
        assert np.abs(np.asarray(item.embedding) - mean).max() < TOLERANCE
        assert abs(np.linalg.norm(mean) - 1) > 1e-3  # so unnormalised is what was checked


def test_dimensions_refused_without_matryoshka(served):
    client, _ = served
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=client.models.list().data[0].id, input="zo", dimensions=8)
    assert e.value.body["param"] == "dimensions"
    assert "does not support matryoshka representation" in e.value.body["message"]


def test_a_generating_model_refuses_embeddings(smol_stack):
    client = OpenAI(base_url=smol_stack.base_url, api_key="none", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="SmolLM2-135M-Instruct", input="hello")
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_supported"
    assert "served for generation, not embeddings" in e.value.body["message"]
