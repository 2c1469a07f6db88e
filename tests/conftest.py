"""Fixtures shared by the whole test suite."""

import os
from pathlib import Path

import torch

# Triton binds its language helpers when it is first imported, so the interpreter must be chosen
# before any test module imports triton: on a machine without CUDA, kernels run interpreted.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Each test's workers time their kernels afresh, as before the cache existed: a cached choice from
# an earlier test (or an earlier run) must not decide what a test of the timing itself observes
# (tests/worker/test_kernel_choices.py turns the cache on, in a temporary file).
os.environ.setdefault("PAGEDSERVE_KERNEL_CHOICES", "off")

# The workers the tests start share 2 cores with pytest, clients and other servers: there a
# spinning OpenMP thread holds a core another process needs (tests/stack 25-30% slower with the
# worker's default bounded spin, interleaved runs), so they sleep at once, as docs/PERFORMANCE.md
# advises for busy cores. Results do not depend on it; tests of the default unset it.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import pytest

from pagedserve.entrypoints.fetch_model import MARKER

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO_ROOT / "models" / "SmolLM2-135M-Instruct"


STACK_DIR = Path(__file__).resolve().parent / "stack"


def pytest_collection_modifyitems(items):
    """The `stack` marker: every test under tests/stack/ (real processes talking gRPC and HTTP) and
    every test anywhere that uses the shared live server. Tests elsewhere that start a process
    carry the marker themselves. `make test-unit` runs what is left (`-m "not stack"`)."""
    for item in items:
        if STACK_DIR in Path(item.path).parents or "smol_stack" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.stack)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The Hugging Face directory `make model` writes. A missing model is a broken setup, not a
    reason to skip: fail loudly so the tests that need it are never silently left out."""
    if not (MODEL_DIR / MARKER).is_file():
        pytest.fail(f"{MODEL_DIR} is missing or incomplete: run `make model` first", pytrace=False)
    return MODEL_DIR


@pytest.fixture(scope="session")
def smol_stack(model_dir, tmp_path_factory):
    """One `pagedserve serve` of SmolLM2 with default flags, shared by every test that only sends
    requests to it (starting a stack costs ~15 s of the suite's 2 cores). Tests that change the
    server's state (kill a process, restart, special flags) start their own with tests.helpers.stack.run_stack."""
    from tests.helpers.stack import run_stack
    with run_stack(model_dir, "--served-model-name", "SmolLM2-135M-Instruct",
                   "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                   log_dir=tmp_path_factory.mktemp("smol-stack")) as stack:
        yield stack


STACK_LOG_TAIL = 8000  # characters of a failing test's stack log shown in its report


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test that used a live stack reports the stack's log: CI shows only the test
    output, and a process that died or never restarted says why only there."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    from tests.helpers.stack import Stack
    for name, value in getattr(item, "funcargs", {}).items():
        if isinstance(value, Stack):
            try:
                lines = [line for line in value.log().splitlines() if "loading weights" not in line]
            except OSError as e:  # the log is gone: say so rather than hide the test's own failure
                lines = [f"(the stack's log could not be read: {e})"]
            report.sections.append((f"log of the stack `{name}` (its end)",
                                    "\n".join(lines)[-STACK_LOG_TAIL:]))
