"""Issue 31's case: packages of other people's named like our rooms. Hugging Face's `kernels` (the
kernel hub, which transformers imports when it is installed) and modules named `scheduler`,
`router` and `worker` sit on PYTHONPATH; `pagedserve serve` started from a folder outside the
repository serves a chat all the same, and imports none of them in place of its own."""
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from tests.helpers.stack import ROOT, run_stack

# The release of Hugging Face's kernels that the pinned transformers accepts (it imports it then).
HF_KERNELS = "kernels==0.18.3"
HF_KERNELS_DEPS = ["tomlkit==0.15.3"]  # its one dependency our venv lacks
TRAP = ("import pathlib\npathlib.Path({marker!r}).write_text(__name__)\n"
        "raise ImportError('a stranger named {name} was imported')\n")


@pytest.fixture(scope="module")
def foreign_path(tmp_path_factory) -> tuple[Path, Path]:
    """(a folder for PYTHONPATH holding HF's kernels and three trap modules, the traps' marker folder)."""
    site = tmp_path_factory.mktemp("foreign-site")
    markers = tmp_path_factory.mktemp("sprung")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                    HF_KERNELS, *HF_KERNELS_DEPS], check=True, capture_output=True, timeout=300)
    for name in ("scheduler", "router", "worker"):
        (site / f"{name}.py").write_text(TRAP.format(marker=str(markers / name), name=name))
    return site, markers


def test_the_foreign_kernels_is_what_import_kernels_finds(foreign_path):
    """The setting is real: in that environment, `kernels` is Hugging Face's, transformers takes it
    for its kernel hub, and our kernels are `pagedserve.kernels`."""
    site, _ = foreign_path
    probe = ("import kernels, pagedserve.kernels\n"
             "from transformers.utils.import_utils import is_kernels_available\n"
             "print(kernels.__file__, pagedserve.kernels.__file__, is_kernels_available())")
    done = subprocess.run([sys.executable, "-c", probe], cwd=site.parent, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(site)}, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    hf, ours, available = done.stdout.split()
    assert Path(hf).is_relative_to(site) and Path(ours) == ROOT / "kernels" / "__init__.py"
    assert available == "True"


def test_serve_from_outside_the_repository_beside_foreign_packages(model_dir, foreign_path, tmp_path):
    site, markers = foreign_path
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "scheduler.py").write_text(TRAP.format(marker=str(markers / "cwd-scheduler"), name="scheduler"))
    with run_stack(model_dir, "--served-model-name", "smol", "--max-num-seqs", "4", log_dir=tmp_path,
                   cwd=elsewhere, env={"PYTHONPATH": str(site)}) as stack:
        client = openai.OpenAI(base_url=stack.base_url, api_key="none")
        reply = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi!"}],
                                               max_tokens=8, temperature=0)
        assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    assert list(markers.iterdir()) == [], "a foreign module was imported in place of ours"


def test_the_tests_run_beside_hugging_faces_kernels(foreign_path):
    """The test processes keep the repository's root on sys.path (for `tests`); with Hugging Face's
    `kernels` installed, transformers still gets it, not our kernels/ folder
    (tests/helpers/foreign_names.py), in pytest and in the tensor-parallel ranks it spawns."""
    site, _ = foreign_path
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/worker/test_loader.py", "tests/worker/test_prompt_logprobs.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(site)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
