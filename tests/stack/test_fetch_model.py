"""The directory `make model` writes: a plain HF model equal to the GGUF it was converted from."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pagedserve.entrypoints.fetch_model import GGUF_MEMBER

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
CHATML_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def cached_gguf(model_dir) -> Path:
    path = model_dir.parent / ".cache" / Path(GGUF_MEMBER).name
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `make model` (with the default cache dir) first", pytrace=False)
    return path


def load_gguf_model(gguf_path: Path, monkeypatch):
    """transformers' own GGUF loader, as an independent reference for fetch_model's conversion."""
    import transformers.modeling_utils
    from transformers import AutoModelForCausalLM
    from transformers.utils import is_accelerate_available

    if not is_accelerate_available():
        # from_pretrained(gguf_file=...) refuses to start without accelerate, which it only needs to
        # dispatch over several devices; pagedserve does not depend on it, and one CPU needs none.
        monkeypatch.setattr(transformers.modeling_utils, "is_accelerate_available", lambda *a, **k: True)
    return AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)


@pytest.mark.slow
def test_logits_match_the_gguf(model_dir, cached_gguf, tokenizer, monkeypatch):
    from transformers import AutoModelForCausalLM

    inputs = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    converted = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = load_gguf_model(cached_gguf, monkeypatch)
    with torch.no_grad():
        got = converted(**inputs).logits
        want = reference(**inputs).logits
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # Tied as upstream: one tensor, stored once.
    assert converted.lm_head.weight.data_ptr() == converted.model.embed_tokens.weight.data_ptr()


def test_config_is_plain_llama(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "float32"
    assert (config["eos_token_id"], config["bos_token_id"]) == (2, 1)
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2


def test_tokenizer_applies_chat_template(tokenizer):
    assert tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True) == CHATML_PROMPT
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids[0] == 1  # <|im_start|>, not a BOS added on top of the template
    assert tokenizer.eos_token_id == 2
    assert tokenizer.decode(ids) == CHATML_PROMPT


def test_second_fetch_is_a_no_op(model_dir):
    before = {path.name: path.stat().st_mtime_ns for path in model_dir.iterdir()}
    result = subprocess.run(
        [sys.executable, "-m", "pagedserve.entrypoints.fetch_model", "--output", str(model_dir)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "already complete" in result.stdout
    assert {path.name: path.stat().st_mtime_ns for path in model_dir.iterdir()} == before
