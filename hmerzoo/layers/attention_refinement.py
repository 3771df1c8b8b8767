"""CoMER's Attention Refinement Module (ARM); HMER-MTL's variant puts a CBAM (``cbam.py``) inside it.

The ARM turns coverage maps (attention summed over past decoding steps) into a per-head correction of the
cross-attention logits (Zhao & Gao, ECCV 2022; official ``comer/model/transformer/arm.py``):

    coverage [M, C, h, w] -> Conv 5x5 (C -> dc) -> ReLU -> [CBAM] -> zero the padding -> Conv 1x1 (dc -> nhead, no
    bias) -> BatchNorm over the non-padded positions only -> [M, nhead, h, w]

``M`` is rows x decoding steps; every step's coverage map is refined on its own, so the same module serves
teacher forcing (all steps at once) and incremental decoding (one step at a time, see ``decoders/comer.py``).
The caller builds the coverage (which attention maps, summed over which steps); this module only maps it.

In eval mode every operation is per position or per (row, step) map, with BatchNorm on its running statistics,
which is what makes incremental decoding exact.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cbam import CBAM
from .masked_batch_norm import MaskedBatchNorm


class AttentionRefinement(nn.Module):
    """Coverage maps [M, in_channels, h, w] + padding [M, h, w] -> logit corrections [M, nhead, h, w].

    ``in_channels`` is ``2 * nhead`` with cross and self coverage, ``nhead`` with one of them. ``cbam``: insert
    a CBAM (HMER-MTL) after the 5x5 conv's ReLU, before the padding is zeroed.
    """

    def __init__(self, nhead: int, in_channels: int, dc: int = 32, cbam: bool = False, cbam_ratio: int = 2,
                 cbam_kernel: int = 7, cbam_mask_aware: bool = False):
        super().__init__()
        self.nhead = nhead
        self.conv = nn.Conv2d(in_channels, dc, kernel_size=5, padding=2)
        self.cbam = CBAM(dc, cbam_ratio, cbam_kernel, cbam_mask_aware) if cbam else None
        self.proj = nn.Conv2d(dc, nhead, kernel_size=1, bias=False)
        self.norm = MaskedBatchNorm(nhead)

    def forward(self, coverage: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(coverage))
        if self.cbam is not None:
            x = self.cbam(x, pad)
        # zeroing before the bias-free 1x1 conv keeps padded positions at exactly 0 through the masked BatchNorm
        x = self.proj(x.masked_fill(pad[:, None], 0.0))
        return self.norm(x, pad)
