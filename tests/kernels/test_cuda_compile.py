"""The Triton kernels compile for a Hopper GPU (sm_90) at the shapes the worker launches, checked
on any machine by tests/helpers/cuda_compile.py in a process of its own (it needs TRITON_INTERPRET unset,
which this test process has set)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import cuda_compile

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compiled() -> dict[str, str | None]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-m", "tests.helpers.cuda_compile"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {row["name"]: row["error"] for row in rows}


@pytest.mark.parametrize("name", cuda_compile.NAMES)
def test_kernel_compiles_for_sm90(compiled, name):
    assert name in compiled, "the compile script stopped before this variant"
    assert compiled[name] is None, compiled[name]
