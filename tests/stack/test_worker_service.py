"""`python -m pagedserve.worker` as a real process: health, GetWorkerInfo, one Execute stream, clean SIGTERM."""
import queue
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagedserve.v1 import scheduler_pb2, worker_pb2, worker_pb2_grpc
from pagedserve.scheduler.validation import with_defaults

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, eos_token_id=1,
                         tie_word_embeddings=True)  # the other tests cover an untied head
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return path, model


def wait_serving(channel, proc, timeout=60.0):
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"worker exited with {proc.returncode}: {proc.stderr.read()}"
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise AssertionError("worker was not SERVING in time")


def test_worker_process_serves_and_stops_cleanly(tiny_model):
    path, hf_model = tiny_model
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pagedserve.worker", "--model", str(path), "--port", str(port), "--block-size", "4",
         "--num-gpu-blocks-override", "32", "--num-threads", "1"],
        cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_serving(channel, proc)
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(service="pagedserve.v1.Worker")).status == \
                health_pb2.HealthCheckResponse.SERVING

            stub = worker_pb2_grpc.WorkerStub(channel)
            info = stub.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest(), timeout=5)
            assert (info.num_kv_blocks, info.block_size, info.max_model_len, info.vocab_size) == (32, 4, 256, 128)
            assert list(info.eos_token_ids) == [1] and info.dtype == "float32" and info.device == "cpu"

            prompt = [5, 6, 7, 8, 9, 10, 11]
            plans = queue.Queue()
            results = stub.Execute(iter(plans.get, None), timeout=30)
            plans.put(worker_pb2.StepPlan(
                step_id=1,
                new_sequences=[worker_pb2.NewSequence(seq_id=3, token_ids=prompt,
                                                      params=with_defaults(scheduler_pb2.SamplingParams(temperature=0)))],
                scheduled=[worker_pb2.ScheduledSequence(seq_id=3, num_tokens=7, new_block_ids=[0, 1])]))
            first = next(results)
            plans.put(worker_pb2.StepPlan(step_id=2, scheduled=[worker_pb2.ScheduledSequence(seq_id=3, num_tokens=1)]))
            second = next(results)
            plans.put(None)  # end of the stream
            assert list(results) == []
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    stderr = proc.stderr.read()
    assert code == 0, stderr
    assert f"worker listening on 127.0.0.1:{port}" in stderr

    assert (first.step_id, first.error, list(first.seq_ids)) == (1, "", [3])
    assert (second.step_id, second.error, list(second.seq_ids)) == (2, "", [3])
    with torch.inference_mode():
        expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=2, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert [first.token_ids[0], second.token_ids[0]] == expected
