"""Device-dependent flags: the step budget's default by the workers' device (the scheduler asks
them, so `python -m pagedserve.scheduler` and `pagedserve serve` agree), and the CUDA graph flags on every
worker (parsed by the worker's real CLI)."""
import pytest

from pagedserve.entrypoints.launcher import Launcher
from pagedserve.entrypoints.local_server import serve_args
from pagedserve.v1 import worker_pb2 as wpb
from pagedserve.scheduler.__main__ import model_info, parse_args as parse_scheduler_args, scheduler_config
from pagedserve.worker.__main__ import parse_args, worker_config


@pytest.mark.parametrize("device,given,expected", [("cuda:0", None, 8192), ("cpu", None, 2048),
                                                   ("cuda", 1024, 1024), ("cpu", 4096, 4096)])
def test_max_num_batched_tokens_defaults_by_the_workers_device(device, given, expected):
    args = serve_args("m", max_num_batched_tokens=given)
    argv = Launcher(args).scheduler_command(["127.0.0.1:1"])[4:]
    infos = [wpb.WorkerInfo(device=device, num_kv_blocks=n, block_size=16, max_model_len=4096,
                            model_path="m") for n in (90, 80)]
    config = scheduler_config(parse_scheduler_args(argv), infos)
    assert config.max_num_batched_tokens == expected
    assert (config.num_blocks, config.block_size, config.max_model_len) == (80, 16, 4096)


@pytest.mark.parametrize("flag, expected", [(None, 4096), (1024, 1024), (8192, 4096)])
def test_max_model_len_may_lower_what_the_workers_serve_never_raise_it(flag, expected):
    args = parse_scheduler_args(["--worker-addrs", "127.0.0.1:1"]
                                + (["--max-model-len", str(flag)] if flag else []))
    info = wpb.WorkerInfo(device="cpu", num_kv_blocks=8, block_size=16, max_model_len=4096, model_path="m")
    assert model_info(args, info).max_model_len == scheduler_config(args, [info]).max_model_len == expected


@pytest.mark.parametrize("flags", [{}, {"enforce_eager": True, "max_cudagraph_capture_size": 64, "max_num_seqs": 32}])
def test_cuda_graph_flags_reach_the_worker(flags):
    args = serve_args("m", device="cuda", **flags)
    cmd = Launcher(args).worker_command(0, 50061, 29500)
    config = worker_config(parse_args(cmd[cmd.index("--model"):]))
    assert config.enforce_eager == flags.get("enforce_eager", False)
    assert config.max_cudagraph_capture_size == flags.get("max_cudagraph_capture_size", 512)
    assert config.max_num_seqs == flags.get("max_num_seqs", 256)


@pytest.mark.parametrize("model, extra, expected", [
    ("/m/SmolLM2", {}, "SmolLM2"),
    ("/m/x.Q4_1.gguf", {"tokenizer": "/m/SmolLM2/"}, "SmolLM2"),  # the name the scheduler serves
    ("/m/x.gguf", {"tokenizer": "/m/tok", "served_model_name": "mine"}, "mine"),
])
def test_the_banner_names_the_model_as_the_api_serves_it(model, extra, expected):
    from pagedserve.entrypoints.launcher import served_name
    assert served_name(serve_args(model, **extra)) == expected
