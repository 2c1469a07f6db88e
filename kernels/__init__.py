"""Triton kernels for the paged KV cache, with plain-torch references beside them.

Layout and contracts are documented in kv_write.py and paged_attention.py.
"""

from pagedserve.kernels.kv_write import write_kv
from pagedserve.kernels.paged_attention import paged_attention
from pagedserve.kernels.reference import paged_attention_reference, write_kv_reference

__all__ = ["write_kv", "paged_attention", "write_kv_reference", "paged_attention_reference"]
