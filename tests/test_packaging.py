"""The distribution installs one import root, `pagedserve`, over the folders the design keeps at the
top level (pyproject's package-dir), and misses none of their packages or data."""
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def packages_in_tree() -> set[str]:
    """Every folder with an __init__.py under package-dir's folders, by its import name."""
    found = set()
    for package, folder in SETUPTOOLS["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            found.add(".".join([package, *init.parent.relative_to(ROOT / folder).parts]))
    return found


def test_pyproject_lists_every_package_of_the_tree():
    assert set(SETUPTOOLS["packages"]) == packages_in_tree()


def test_the_wheel_holds_pagedserve_alone_with_every_module_and_c_source(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    [wheel] = tmp_path.glob("pagedserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    [top_level] = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["pagedserve"]
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"pagedserve"}
    expected = {f"{package.replace('.', '/')}/{path.relative_to(ROOT / folder).as_posix()}"
                for package, folder in SETUPTOOLS["package-dir"].items()
                for pattern in ("*.py", "*.c", "*.h") for path in (ROOT / folder).rglob(pattern)}
    assert expected <= set(names), sorted(expected - set(names))[:10]
