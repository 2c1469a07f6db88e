"""The layers of docs/ARCHITECTURE.md, held by import-linter's contracts in pyproject.toml: no
process imports the layer above the processes (pagedserve.entrypoints), the processes never import
each other (they talk gRPC), and the ground (the v1 stubs, flags, parent_watch, sampling_ranges) imports neither.

import-linter reads a package's modules from its folder, and ours spans five (pyproject's
package-dir: `router/` is `pagedserve.router`): it runs on the tree as a wheel lays it out.
"""
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=120)


def installed_layout(source: Path, dest: Path) -> Path:
    """Copies the Python files of `source` (a tree laid out as this repository) into `dest` as the
    wheel installs them, by pyproject's package-dir; returns `dest`."""
    package_dir = tomllib.loads((source / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in package_dir.items():
        target = dest.joinpath(*package.split("."))
        for file in (source / folder).rglob("*.py"):
            copy = target / file.relative_to(source / folder)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(file, copy)
    shutil.copy(source / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_the_code_keeps_its_layers(tmp_path):
    done = lint_imports(installed_layout(ROOT, tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 kept, 0 broken" in done.stdout


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_a_process_importing_the_launcher_breaks_the_contract(tmp_path):
    """The contracts can fail: a tree shaped like ours where the router imports the launcher and
    the worker imports the scheduler."""
    source = tmp_path / "source"
    write(source, {
        "pagedserve/__init__.py": "", "pagedserve/flags.py": "", "pagedserve/parent_watch.py": "",
        "pagedserve/sampling_ranges.py": "",
        "pagedserve/v1/__init__.py": "", "pagedserve/entrypoints/__init__.py": "",
        "pagedserve/entrypoints/launcher.py": "",
        "router/__init__.py": "", "router/app.py": "import pagedserve.entrypoints.launcher\n",
        "scheduler/__init__.py": "", "scheduler/engine.py": "import pagedserve.flags\n",
        "worker/__init__.py": "", "worker/service.py": "import pagedserve.scheduler.engine\n",
        "kernels/__init__.py": "",
    })
    shutil.copy(ROOT / "pyproject.toml", source / "pyproject.toml")
    done = lint_imports(installed_layout(source, tmp_path / "installed"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "no process imports the layer above the processes BROKEN" in done.stdout
    assert "the processes talk gRPC, not imports BROKEN" in done.stdout
    assert "the ground imports no process and nothing above it KEPT" in done.stdout
