"""What every model class offers the loader and the model runner, and the parts they share.

A model is built from config.json (a SimpleNamespace, `config_defaults` filled in where the file
says nothing, as the architecture's transformers config class would), names its parameters as the
checkpoint does (a fused projection's name the checkpoint tensors it holds: sharding.Fused), and
runs over a flat varlen batch: forward(input_ids, positions, kv_caches, meta) -> hidden
[T, hidden] before the final norm; compute_logits(hidden rows) -> [N, vocab] float32.
"""
import torch
from torch import nn

from pagedserve.worker.models.layers import gather_logits


class CausalLM(nn.Module):
    # config.json keys the file may omit, with the values transformers' config class defaults to.
    config_defaults: dict = {}
    # Standard names -> this architecture's own config.json keys (transformers' attribute_map).
    config_aliases: dict = {}
    # Checkpoints saved from the bare base model (older hub uploads) name tensors without it.
    checkpoint_prefix = "model."

    def __init__(self, config):
        super().__init__()
        self.config = config

    @classmethod
    def sliding_windows(cls, config) -> list[int | None]:
        """Per layer, its sliding attention window (a query sees its last `window` positions,
        itself included) or None (full attention): what the layer passes the attention backend."""
        return [None] * config.num_hidden_layers

    @classmethod
    def kv_sliding_window(cls, config) -> int | None:
        """The window the scheduler may release KV blocks behind: the one window of every layer,
        or None where any layer attends to the whole context (all blocks are then kept)."""
        windows = set(cls.sliding_windows(config))
        return windows.pop() if len(windows) == 1 else None

    def input_embeddings(self) -> nn.Embedding:
        raise NotImplementedError

    def final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last transforms before the LM head (final norm, projection)."""
        raise NotImplementedError

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when the checkpoint does (it then stores one tensor).
        Called again by the loader: moving a model off the meta device unties parameters."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.input_embeddings().weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] in float32 for the N positions that sample (the final transforms are
        per row, so skipping the other rows changes nothing)."""
        local = self.lm_head(self.final_hidden(hidden))
        return gather_logits(local, self.config.vocab_size).float()

    def kv_cache_shape(self) -> tuple[int, int, int]:
        """(num_layers, num_kv_heads, head_dim) of this rank: what the KV cache allocator needs."""
        attention = [m for m in self.modules() if hasattr(m, "num_kv_heads")]
        return len(attention), attention[0].num_kv_heads, attention[0].head_dim
