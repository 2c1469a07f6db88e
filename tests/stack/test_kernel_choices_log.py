"""`pagedserve serve` prints each worker's dtype and CPU kernel choices (its WorkerInfo) once the
worker is up (pagedserve/entrypoints/worker_report.py), on the shared SmolLM2 server."""
import re


def test_the_launcher_prints_each_workers_kernel_choices(smol_stack):
    line = next(line for line in smol_stack.log().splitlines() if line.startswith("pagedserve: worker 0: "))
    assert line.startswith("pagedserve: worker 0: float32 on cpu; kernel choices: ")  # a float32 checkpoint
    # SmolLM2's four layer shapes and its LM head, each with the path chosen at one row
    shapes = re.findall(r"float32 linear (\d+x\d+) at 1 row: (?:cpu/linear\.c|F\.linear) \((?:timed|cached)\)", line)
    assert shapes == ["960x576", "576x576", "3072x576", "576x1536", "49152x576"]
