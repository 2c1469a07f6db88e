"""`bench compare --dtype`: pagedserve and vLLM are started in the same dtype (float32 unless told),
as parsed from the command line, without a server."""
from __future__ import annotations


import pytest

from pagedserve.entrypoints.bench import compare
from pagedserve.entrypoints.cli import build_parser



def flag(cmd: list[str], name: str) -> list[str]:
    """Every value `name` is given in `cmd` (argparse keeps the last)."""
    return [cmd[i + 1] for i, arg in enumerate(cmd) if arg == name]


@pytest.mark.parametrize("argv,want", [([], "float32"), (["--dtype", "bfloat16"], "bfloat16"),
                                       (["--dtype", "float32"], "float32")])
@pytest.mark.parametrize("subcommand", ["compare", "one-user"])
def test_pagedserve_and_vllm_serve_in_the_same_dtype(bench_model_dir, subcommand, argv, want):
    args = build_parser().parse_args(["bench", subcommand, "--model", str(bench_model_dir), *argv])
    for system in ("pagedserve", "vllm", "vllm-default"):
        cmd, _ = compare.server_command(args, system, 8000)
        assert flag(cmd, "--dtype") == [want], (system, cmd)
        assert f"--dtype {want}" in compare.settings(args, system)


def test_server_arg_comes_after_the_dtype_so_it_wins(bench_model_dir):
    args = build_parser().parse_args(["bench", "compare", "--model", str(bench_model_dir), "--dtype", "bfloat16",
                                      "--server-arg=--dtype=float32"])
    cmd, _ = compare.server_command(args, "pagedserve", 8000)
    assert cmd.index("--dtype") < cmd.index("--dtype=float32")
    assert flag(compare.server_command(args, "vllm", 8000)[0], "--dtype") == ["bfloat16"]


def test_other_dtypes_are_refused(bench_model_dir, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "compare", "--model", str(bench_model_dir), "--dtype", "int8"])
    assert "invalid choice" in capsys.readouterr().err


def test_llamacpp_takes_no_dtype(bench_model_dir, tmp_path):
    args = build_parser().parse_args(["bench", "compare", "--model", str(bench_model_dir), "--dtype", "bfloat16"])
    args.source_model = args.model
    cmd, _ = compare.server_command(args, "llamacpp", 8000)
    assert "--dtype" not in cmd
