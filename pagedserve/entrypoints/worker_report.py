"""The line the launcher prints for each worker once it is up: the dtype it serves and the CPU
path's kernel choices (WorkerInfo.kernel_choices: timed at start-up or read back from the CPU's
cache, worker/cpu/kernel_choices.py), so the choices are visible without the worker's log."""
from __future__ import annotations

import grpc

from pagedserve.v1 import worker_pb2, worker_pb2_grpc


def describe_worker(name: str, address: str, timeout: float = 5.0) -> str:
    """"pagedserve: <name>: <dtype> on <device>; kernel choices: ..." from the worker's
    GetWorkerInfo; a line saying it did not answer (never an exception) otherwise."""
    try:
        with grpc.insecure_channel(address) as channel:
            info = worker_pb2_grpc.WorkerStub(channel).GetWorkerInfo(worker_pb2.GetWorkerInfoRequest(),
                                                                     timeout=timeout)
    except grpc.RpcError as e:
        return f"pagedserve: {name}: GetWorkerInfo failed ({e.code().name})"
    line = f"pagedserve: {name}: {info.dtype} on {info.device}"
    if info.kernel_choices:
        line += "; kernel choices: " + "; ".join(info.kernel_choices)
    return line
