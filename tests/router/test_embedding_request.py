"""POST /v1/embeddings bodies read by router/embedding_request.py (every input form, the field
policy, errors that name the field) and the response's base64 encoding, without a server."""
import base64

import numpy as np
import pytest

from pagedserve.router.embedding_request import MAX_INPUTS, not_served, parse_embedding
from pagedserve.router.embeddings import encode, response_body
from pagedserve.router.errors import APIError
from pagedserve.router.model import ServedModel
from pagedserve.router.tokenizer import Tokenizer
from tests.helpers import tiny_models


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tiny_models.tokenizer().save_pretrained(path)
    return ServedModel("emb", str(path), 16, tiny_models.VOCAB_SIZE, frozenset([0]), Tokenizer(str(path)), 0,
                       runner="pooling")


def test_the_four_input_forms(model):
    text = "bada kefi"
    ids = model.tokenizer.encode(text)
    assert parse_embedding({"input": text}, model).prompts == [ids]
    assert parse_embedding({"input": [text, "zo"]}, model).prompts == [ids, model.tokenizer.encode("zo")]
    assert parse_embedding({"input": [5, 6, 7]}, model).prompts == [[5, 6, 7]]
    assert parse_embedding({"input": [[5, 6], [7]]}, model).prompts == [[5, 6], [7]]


def test_options(model):
    req = parse_embedding({"input": "a", "model": "emb", "dimensions": 8, "encoding_format": "base64",
                           "normalize": False, "user": "u"}, model)
    assert req.pooling.dimensions == 8 and req.pooling.normalize is False and req.encoding_format == "base64"
    req = parse_embedding({"input": "a"}, model)
    assert not req.pooling.HasField("dimensions") and not req.pooling.HasField("normalize")
    assert req.encoding_format == "float"


@pytest.mark.parametrize("body, param, message", [
    ({}, "input", "'input' is required"),
    ({"input": ""}, "input", "'input[0]' is empty"),
    ({"input": []}, "input", "non-empty"),
    ({"input": [[]]}, "input", "'input[0]' is empty"),
    ({"input": [[1], "a", {}]}, "input", "'input[2]' must be a string or an array of token ids"),
    ({"input": [1000]}, "input", "token id 1000, outside [0, 1000)"),
    ({"input": list(range(17))}, "input", "maximum context length is 16 tokens"),
    ({"input": ["a"] * (MAX_INPUTS + 1)}, "input", f"at most {MAX_INPUTS}"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format", "must be one of float, base64"),
    ({"input": "a", "dimensions": 0}, "dimensions", "must be >= 1"),
    ({"input": "a", "dimensions": "8"}, "dimensions", "must be an integer"),
    ({"input": "a", "temperature": 1}, "temperature", "Unrecognized request argument supplied: temperature"),
    ({"input": "a", "truncate_prompt_tokens": 4}, "truncate_prompt_tokens", "not supported"),
    ({"input": "a", "user": 3}, "user", "must be a string"),
])
def test_errors_name_the_field(model, body, param, message):
    with pytest.raises(APIError) as e:
        parse_embedding(body, model)
    assert (e.value.status, e.value.param) == (400, param)
    assert message in e.value.message


def test_the_wrong_model_or_runner(model):
    with pytest.raises(APIError) as e:
        parse_embedding({"input": "a", "model": "other"}, model)
    assert e.value.status == 404
    generating = ServedModel("gen", model.path, 16, 1000, frozenset(), model.tokenizer, 0)
    with pytest.raises(APIError) as e:
        parse_embedding({"input": "a"}, generating)
    assert (e.value.status, e.value.param, e.value.code) == (400, "model", "model_not_supported")
    assert "served for generation, not embeddings" in e.value.message
    error = not_served(model)
    assert error.param == "model" and "/v1/embeddings" in error.message


def test_base64_is_little_endian_float32(model):
    vector = [0.1, -2.5, 3e-8]
    decoded = np.frombuffer(base64.b64decode(encode(vector, "base64")), dtype="<f4")
    assert decoded.tolist() == np.asarray(vector, dtype=np.float32).tolist()
    assert encode(vector, "float") == vector


def test_response_shape(model):
    req = parse_embedding({"input": ["a", "b"]}, model)
    body = response_body(req, [[1.0], [2.0]], 7, "emb", "embd-1")
    assert body["object"] == "list" and body["model"] == "emb"
    assert body["data"] == [{"object": "embedding", "index": 0, "embedding": [1.0]},
                            {"object": "embedding", "index": 1, "embedding": [2.0]}]
    assert body["usage"] == {"prompt_tokens": 7, "total_tokens": 7}


def test_every_field_is_documented_and_every_sdk_field_known():
    from pathlib import Path

    from openai.types import embedding_create_params

    from pagedserve.router.embedding_request import FIELDS
    doc = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text().split("## Embeddings", 1)[1]
    assert [name for name in FIELDS if f"`{name}`" not in doc] == []
    assert sorted(set(embedding_create_params.EmbeddingCreateParams.__annotations__) - set(FIELDS)) == []
