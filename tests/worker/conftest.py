"""The tiny random Llama and a ModelRunner on it, shared by the worker's tests that drive the runner
by hand (tests/helpers/model_driver.py)."""
import pytest

from pagedserve.worker.config import WorkerConfig
from pagedserve.worker.model_runner import ModelRunner
from tests.helpers.model_driver import BLOCK_SIZE, make_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model directory, the transformers model saved there)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    return path, make_tiny_llama(path)


@pytest.fixture(scope="module")
def runner(tiny):
    return ModelRunner(WorkerConfig(model=str(tiny[0]), block_size=BLOCK_SIZE, num_gpu_blocks_override=128))
