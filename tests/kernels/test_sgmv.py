"""The SGMV LoRA kernels (kernels/sgmv.py) against plain torch and against the worker's grouped
torch path (worker/lora_manager.py's grouped_lora): segments of several slots, base-model rows
between them left at zero, rank padding inside the slots. Without CUDA under Triton's interpreter
(TRITON_INTERPRET=1, set by tests/conftest.py), on small shapes."""
import numpy as np
import pytest
import torch

from pagedserve.kernels.sgmv import sgmv_lora, sgmv_lora_reference
from pagedserve.worker.lora_manager import StepGroups, grouped_lora

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("token_slots, rank, in_features, out_features", [
    ([0, 1, -1, 1, 0, 0, 0, 2, -1], 8, 64, 96),  # decodes of three adapters and the base model
    ([-1] * 3 + [1] * 40 + [0] * 21 + [-1] * 5, 48, 80, 130),  # prefill segments longer than a tile
    ([-1, -1], 16, 64, 64),  # no LoRA row at all
])
def test_sgmv_matches_torch(token_slots, rank, in_features, out_features):
    torch.manual_seed(0)
    token_slots = np.asarray(token_slots)
    x = torch.randn(len(token_slots), in_features, device=DEVICE)
    a = torch.randn(3, rank, in_features, device=DEVICE)
    b = torch.randn(3, out_features, rank, device=DEVICE)
    a[:, rank // 2:] = 0  # a smaller adapter in a slot of --max-lora-rank
    b[:, :, rank // 2:] = 0
    groups = StepGroups(token_slots, torch.device(DEVICE))
    got = sgmv_lora(x, a, b, groups.seg_start, groups.seg_end, groups.seg_slot, groups.max_seg_len)
    expected = sgmv_lora_reference(x, a, b, groups.seg_start, groups.seg_end, groups.seg_slot)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(got[torch.from_numpy(token_slots < 0)], torch.zeros_like(got[token_slots < 0]))
    if DEVICE == "cpu":  # the worker's CPU path: rows gathered by slot
        torch.testing.assert_close(grouped_lora(x, a, b, groups), expected, atol=1e-3, rtol=1e-4)
