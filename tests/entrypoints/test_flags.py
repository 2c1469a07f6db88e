"""Flags are declared once (pagedserve/flags.py): `pagedserve serve` hands each process exactly what
the process would parse itself, and no flag has two defaults."""
from __future__ import annotations

import argparse
import os

import pytest

from pagedserve.flags import FLAG, flag_fields
from pagedserve.entrypoints.local_server import serve_args
from pagedserve.entrypoints.launcher import Launcher
from pagedserve.entrypoints.serve_args import LauncherArgs
from pagedserve.router.__main__ import parse_args as parse_router_args
from pagedserve.router.settings import RouterArgs
from pagedserve.scheduler.__main__ import parse_args as parse_scheduler_args
from pagedserve.scheduler.config import SchedulerArgs, SchedulerConfig
from pagedserve.worker.__main__ import parse_args as parse_worker_args
from pagedserve.worker.config import WorkerArgs

PROCESS_FLAGS = [WorkerArgs, SchedulerConfig, SchedulerArgs, RouterArgs, LauncherArgs]
# A process's own address is not the same setting as serve's, whatever the name: the worker binds
# loopback and the scheduler its own port.
PER_PROCESS = {"host", "port"}


def test_a_flag_that_several_processes_take_has_one_default_and_one_help():
    seen: dict[str, tuple] = {}
    for cls in PROCESS_FLAGS:
        for f in flag_fields(cls, skip=PER_PROCESS):
            meta = f.metadata[FLAG]
            this = (f.default, meta["help"], meta["env"])
            if f.name == "model" or f.name == "max_model_len":
                this = (meta["env"],)  # required in some, optional in others; helps differ
            assert seen.setdefault(f.name, this) == this, f"--{f.name} differs between processes"


def serve_namespace(**flags) -> argparse.Namespace:
    return serve_args("models/demo", **flags)


@pytest.mark.parametrize("flags", [
    {},
    {"max_num_seqs": 7, "api_key": "k", "max_model_len": 512, "enable_prefix_caching": False,
     "num_gpu_blocks_override": 40, "shutdown_timeout": 5.0, "served_model_name": "demo",
     "chat_template": "t.jinja", "tensor_parallel_size": 2, "dtype": "bfloat16"},
])
def test_each_process_parses_what_serve_hands_it_into_serves_values(flags):
    args = serve_namespace(**flags)
    launcher = Launcher(args)
    worker = parse_worker_args(launcher.worker_command(1, 1234, 999)[4:])
    scheduler = parse_scheduler_args(launcher.scheduler_command(["127.0.0.1:1234"])[4:])
    router = parse_router_args(launcher.router_command()[4:])
    for parsed, cls, own in ((worker, WorkerArgs, {"host", "port", "rank", "world_size",
                                                   "dist_init_addr"}),
                             (scheduler, SchedulerArgs, {"worker_addrs", "host", "port"}),
                             (scheduler, SchedulerConfig, set()),
                             (router, RouterArgs, {"scheduler_addr", "scheduler_addrs", "host",
                                                   "port"})):
        for f in flag_fields(cls, skip=own):
            assert getattr(parsed, f.name) == getattr(args, f.name), f"{cls.__name__}.{f.name}"
    assert (worker.port, worker.host) == (1234, "127.0.0.1")
    assert worker.world_size == args.tensor_parallel_size
    assert (scheduler.port, router.port) == (args.grpc_port, args.port)


def test_an_unknown_offline_flag_is_refused_by_name():
    with pytest.raises(TypeError, match="max_num_seq"):
        serve_namespace(max_num_seq=3)


def test_the_api_key_comes_from_the_environment_when_no_flag_sets_it(monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_API_KEY", "from-env")
    assert parse_router_args([]).api_key == "from-env"
    assert parse_scheduler_args(["--worker-addrs", "a:1"]).api_key == "from-env"
    assert parse_router_args(["--api-key", "flag"]).api_key == "flag"


def test_kv_cache_size_flags_exclude_each_other():
    with pytest.raises(SystemExit):
        parse_worker_args(["--model", "m", "--kv-cache-memory-bytes", "1", "--num-gpu-blocks-override", "2"])


def test_worker_flags_build_its_config():
    from pagedserve.worker.__main__ import worker_config
    config = worker_config(parse_worker_args(["--model", "m", "--block-size", "32", "--world-size", "2",
                                              "--device", "cpu"]))
    assert (config.model, config.block_size, config.world_size) == ("m", 32, 2)
    assert config.num_threads >= 1  # ranks on one CPU host share its cores


def test_data_parallel_replicas_each_get_a_scheduler_port_and_the_router_gets_them_all(monkeypatch):
    from pagedserve.entrypoints.launcher import gpu_slice, replica_name
    args = serve_namespace(data_parallel_size=3, routing_policy="round_robin")
    launcher = Launcher(args)
    assert launcher.grpc_ports == [args.grpc_port, args.grpc_port + 1, args.grpc_port + 2]
    router = parse_router_args(launcher.router_command()[4:])
    assert router.scheduler_addrs == ",".join(f"127.0.0.1:{args.grpc_port + i}" for i in range(3))
    assert router.routing_policy == "round_robin"
    scheduler = parse_scheduler_args(launcher.scheduler_command(["127.0.0.1:1"], 7001)[4:])
    assert scheduler.port == 7001
    assert replica_name("scheduler", 0, 1) == "scheduler"  # one replica: the names as ever
    assert replica_name("worker 1", 2, 3) == "replica 2 worker 1"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [gpu_slice(r, 2) for r in range(2)] == ["0,1", "2,3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    assert gpu_slice(1, 1) == "5"
    with pytest.raises(SystemExit, match="replica 1 needs GPUs 2..3"):
        gpu_slice(1, 2)


def test_a_dead_worker_restarts_its_own_replicas_ranks_only(monkeypatch):
    from pagedserve.entrypoints.launcher import Child

    class Proc:
        def __init__(self, code=None):
            self.returncode, self.killed, self.pid = code, False, 1

        def poll(self):
            return self.returncode

        def kill(self):
            self.killed, self.returncode = True, -9

        def wait(self):
            return self.returncode

    launcher = Launcher(serve_namespace(data_parallel_size=2, tensor_parallel_size=2),
                        output=open(os.devnull, "wb"))
    children = [Child(f"replica {r} worker {k}", [str(r), str(k)], Proc(), 0.0, replica=r,
                      env={"CUDA_VISIBLE_DEVICES": str(r)})
                for r in range(2) for k in range(2)]
    children.append(Child("replica 1 scheduler", ["s"], Proc(), 0.0, replica=1))
    launcher.children = children
    spawned = []
    monkeypatch.setattr(launcher, "spawn", lambda cmd, env=None: spawned.append((cmd, env)) or Proc())
    dead = children[2]  # replica 1, rank 0
    dead.proc.returncode = -9
    assert launcher.restart(dead) is None
    assert spawned == [(["1", "0"], {"CUDA_VISIBLE_DEVICES": "1"}),
                       (["1", "1"], {"CUDA_VISIBLE_DEVICES": "1"})]
    assert not children[0].proc.killed and not children[4].proc.killed  # replica 0, scheduler
