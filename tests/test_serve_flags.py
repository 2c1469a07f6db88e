"""`pagedserve serve`'s device-dependent flags reach the processes that use them: the step budget's
default by --device, and the CUDA graph flags on every worker (parsed by the worker's real CLI)."""
import pytest

from pagedserve.launcher import Launcher
from pagedserve.local_server import serve_args
from worker.__main__ import parse_args, worker_config


def scheduler_flag(args, flag):
    cmd = Launcher(args).scheduler_command(["127.0.0.1:1"])
    return cmd[cmd.index(flag) + 1]


@pytest.mark.parametrize("device,given,expected", [("cuda", None, "8192"), ("cpu", None, "2048"),
                                                   ("cuda", 1024, "1024"), ("cpu", 4096, "4096")])
def test_max_num_batched_tokens_defaults_by_device(device, given, expected):
    args = serve_args("m", device=device, max_num_batched_tokens=given)
    assert scheduler_flag(args, "--max-num-batched-tokens") == expected


@pytest.mark.parametrize("flags", [{}, {"enforce_eager": True, "max_cudagraph_capture_size": 64, "max_num_seqs": 32}])
def test_cuda_graph_flags_reach_the_worker(flags):
    args = serve_args("m", device="cuda", **flags)
    cmd = Launcher(args).worker_command(0, 50061, 29500)
    config = worker_config(parse_args(cmd[cmd.index("--model"):]))
    assert config.enforce_eager == flags.get("enforce_eager", False)
    assert config.max_cudagraph_capture_size == flags.get("max_cudagraph_capture_size", 512)
    assert config.max_num_seqs == flags.get("max_num_seqs", 256)
