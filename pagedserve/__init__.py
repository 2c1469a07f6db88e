"""pagedserve: an LLM serving engine with PagedAttention and continuous batching.

`from pagedserve import LLM, SamplingParams` is the offline API. Those names load on first use:
`import pagedserve` alone (the router reads __version__) stays cheap.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "pagedserve.entrypoints.llm",
    "SamplingParams": "pagedserve.entrypoints.sampling_params",
    "RequestOutput": "pagedserve.entrypoints.outputs",
    "CompletionOutput": "pagedserve.entrypoints.outputs",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pagedserve' has no attribute {name!r}")
