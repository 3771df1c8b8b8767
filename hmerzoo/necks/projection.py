"""BTTR's neck: DenseNet features -> decoder memory (1x1 conv + ReLU -> LayerNorm -> + 2-D position encoding).

The order matters for parity: BTTR normalises *before* adding the position encoding (CoMER does the opposite,
see comer_projection.py). The memory stays channels-last [B,h,w,d]; decoders flatten it themselves.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.posenc import ImagePositionEncoding
from ..registry import NECKS


@NECKS.register("bttr_projection")
class BTTRProjection(nn.Module):
    """features [B,C,h,w], mask [B,h,w] -> memory [B,h,w,d_model], mask [B,h,w] (unchanged)."""

    def __init__(self, in_channels: int, d_model: int = 256):
        super().__init__()
        self.feature_proj = nn.Conv2d(in_channels, d_model, kernel_size=1)
        self.norm = nn.LayerNorm(d_model)
        self.pos_enc = ImagePositionEncoding(d_model, variant="bttr")
        self.out_channels = d_model

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        memory = F.relu(self.feature_proj(features)).permute(0, 2, 3, 1)  # channels last
        memory = self.pos_enc(self.norm(memory), mask)
        return memory, mask
