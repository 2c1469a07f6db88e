"""Fixtures of the tests that send requests to the shared live server (the root conftest's smol_stack)."""
import pytest
from openai import OpenAI
from transformers import AutoTokenizer


@pytest.fixture(scope="package")
def client(smol_stack):
    """The `openai` SDK on the shared server: no retries (a test sees each error), a long timeout."""
    return OpenAI(base_url=smol_stack.base_url, api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="package")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)
