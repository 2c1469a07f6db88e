"""pagedserve: an LLM serving engine with PagedAttention and continuous batching."""

__version__ = "0.1.0"
