"""The worker: model weights, the paged KV cache, attention backends and the sampler, behind the Execute stream."""
