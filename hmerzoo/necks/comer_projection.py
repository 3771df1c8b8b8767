"""CoMER's neck: DenseNet features -> decoder memory (1x1 conv, no ReLU -> + 2-D position encoding -> LayerNorm).

Differs from BTTR's neck in three ways that all change the numbers: no ReLU after the conv, the position
encoding is added *before* the LayerNorm, and CoMER's position-encoding variant (one frequency per sin/cos pair).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..layers.posenc import ImagePositionEncoding
from ..registry import NECKS


@NECKS.register("comer_projection")
class CoMERProjection(nn.Module):
    """features [B,C,h,w], mask [B,h,w] -> memory [B,h,w,d_model], mask [B,h,w] (unchanged)."""

    def __init__(self, in_channels: int, d_model: int = 256):
        super().__init__()
        self.feature_proj = nn.Conv2d(in_channels, d_model, kernel_size=1)
        self.pos_enc = ImagePositionEncoding(d_model, variant="comer")
        self.norm = nn.LayerNorm(d_model)
        self.out_channels = d_model

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        memory = self.feature_proj(features).permute(0, 2, 3, 1)  # channels last
        memory = self.norm(self.pos_enc(memory, mask))
        return memory, mask
