"""Fixtures of the entrypoints tests."""
import json

import pytest


@pytest.fixture
def bench_model_dir(tmp_path):
    """A Hugging Face directory as far as the bench's command lines need one: a config.json with a
    vocabulary."""
    path = tmp_path / "TinyModel"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"vocab_size": 5000}))
    return path
