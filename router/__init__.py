"""The router: pagedserve's OpenAI-compatible HTTP front. It owns text (templates, tokenization,
detokenization, stop strings) and talks to the scheduler only in token ids over gRPC."""
