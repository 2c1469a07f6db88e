"""The generated stubs in pagedserve/v1 are exactly what `make protos` makes from protos/."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_fresh(tmp_path):
    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "protos").rglob("*.proto"))
    assert protos, "no .proto files found"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", "protos",
                    f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", *protos], cwd=ROOT, check=True)
    generated = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert generated
    for fresh in generated:
        committed = ROOT / fresh.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run `make protos`"
        assert committed.read_bytes() == fresh.read_bytes(), f"{committed} is stale: run `make protos`"
