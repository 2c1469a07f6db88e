"""The router's tests run a real router (uvicorn, over HTTP) in front of one fake scheduler, shared by
every test of tests/router/ that asks for it (tests/helpers/router_fixtures.py)."""
from __future__ import annotations

import openai
import pytest
from tokenizers import Tokenizer

from tests.helpers.router_fixtures import EOS, Harness


@pytest.fixture(scope="package")
def tokenizer(model_dir) -> Tokenizer:
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


@pytest.fixture(scope="package")
def harness(model_dir, tokenizer):
    h = Harness(str(model_dir), tokenizer.get_vocab_size(), [EOS])
    h.router()
    yield h
    h.close()


@pytest.fixture
def fake(harness):
    harness.fake.reset()
    return harness.fake


@pytest.fixture
def url(harness) -> str:
    return harness.routers[0].url


@pytest.fixture
def client(url, fake) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=20)
