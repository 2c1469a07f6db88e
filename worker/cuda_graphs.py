"""CUDA graphs for decode steps: the model's forward pass captured once per batch size at start-up
and replayed, so a step costs one launch on the host instead of hundreds of kernel launches.

What a step runs as, and how its inputs are padded, is cudagraph_batch.py. Only the forward pass
is captured (vLLM does the same): logits and sampling run eagerly on the rows that sample.

UNTESTED ON A GPU: the capture has never run on one (docs/gpu.md). It is therefore fail-safe: if
capturing raises, the worker logs a warning and serves eagerly.
"""
import logging

import torch

from pagedserve.worker.cudagraph_batch import DecodeBuffers, capture_sizes, padded_size

log = logging.getLogger(__name__)


def graphs_off_reason(config, device: torch.device, backend_name: str) -> str | None:
    """Why this worker runs without CUDA graphs, or None when it captures them."""
    if device.type != "cuda":
        return "not on CUDA"
    if config.enforce_eager:
        return "--enforce-eager"
    if backend_name != "triton":
        return f"the {backend_name} attention backend (graphs need triton's shape-only launch choices)"
    if config.world_size > 1:
        return "tensor parallelism (collectives are not captured)"
    if not capture_sizes(config.max_cudagraph_capture_size, config.max_num_seqs):
        return "--max-cudagraph-capture-size < 1"
    return None


class CudaGraphRunner:
    """One captured graph per batch size of `sizes`, all reading the same DecodeBuffers."""

    def __init__(self, model, kv_caches, buffers: DecodeBuffers, sizes: list[int]):
        self.model, self.kv_caches, self.buffers, self.sizes = model, kv_caches, buffers, sizes
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @torch.inference_mode()
    def capture(self) -> None:
        """Largest first, sharing one memory pool (the smaller graphs fit in what the larger
        freed). Each size runs eagerly once first: Triton compiles, cuBLAS picks its kernels."""
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            meta = self.buffers.meta(size)
            args = (self.buffers.input_ids[:size], self.buffers.positions[:size], self.kv_caches, meta)
            self.model(*args)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self.model(*args)
            self.graphs[size] = (graph, hidden)
        torch.cuda.synchronize()

    def run(self, input_ids, positions, meta) -> torch.Tensor | None:
        """Hidden states [n, hidden] of a decode step replayed from its graph (the padding rows
        dropped), or None when the step is not one a graph serves (run it eagerly)."""
        if not self.buffers.fits(input_ids, meta):
            return None
        size = padded_size(len(input_ids), self.sizes)
        if size is None:
            return None
        self.buffers.fill(input_ids, positions, meta, size)
        graph, hidden = self.graphs[size]
        graph.replay()
        return hidden[: len(input_ids)]


def capture_or_eager(make_runner) -> CudaGraphRunner | None:
    """make_runner() then its capture(); on any failure a warning, and None: the worker runs
    eagerly rather than not at all."""
    try:
        runner = make_runner()
        runner.capture()
    except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager
        log.warning("CUDA graph capture failed, serving without graphs (as --enforce-eager): %s: %s",
                    type(e).__name__, e)
        return None
    log.info("CUDA graphs captured for decode batches of %s sequences", runner.sizes)
    return runner
