"""Mask & Match's attention network over the encoder's feature map, registered as the neck ``mask_match_attention``.

It is the same module in stage 2 (self-supervised, pooling the feature map into one vector) and in stage 3 (the
neck of the recognizer, turning features into decoder memory), so stage 3's ``model.init_from`` finds its weights
under the same names (``neck.*``).

- ``focus_map(features, mask) -> [B, h, w]``: a small conv scorer, then a softmax over the non-padded cells:
  non-negative, summing to 1 over each image's valid cells, exactly 0 on padding.
- ``project(features)``: BTTR's projection without the position encoding (1x1 conv + ReLU -> LayerNorm).
- ``pool(features, mask)``: the focus-weighted sum of the projected cells, one vector per image (stage 2).
- ``forward(features, mask)``: decoder memory [B, h, w, d]. Each cell is re-weighted by
  ``1 + gate * (n * focus - 1)`` (n: the image's valid cells, so a uniform focus leaves the memory as it is;
  ``gate`` is learned), then BTTR's 2-D position encoding is added. The re-weighting comes after the LayerNorm,
  which would otherwise undo a per-cell scale.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.posenc import ImagePositionEncoding
from ..registry import NECKS


@NECKS.register("mask_match_attention")
class AttentionNetwork(nn.Module):
    def __init__(self, in_channels: int, d_model: int = 256, hidden: int = 128, kernel_size: int = 3,
                 gate: float = 1.0):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        self.feature_proj = nn.Conv2d(in_channels, d_model, kernel_size=1)
        self.norm = nn.LayerNorm(d_model)
        self.pos_enc = ImagePositionEncoding(d_model, variant="bttr")
        self.scorer = nn.Sequential(nn.Conv2d(in_channels, hidden, kernel_size, padding=kernel_size // 2),
                                    nn.ReLU(inplace=True), nn.Conv2d(hidden, 1, kernel_size=1))
        self.gate = nn.Parameter(torch.tensor(float(gate)))
        self.out_channels = d_model

    def focus_map(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, h, w] attention over the valid cells (mask: True = padding)."""
        # padded cells are zeroed before scoring, so their features cannot move a neighbour's score
        features = features * (~mask)[:, None].to(features.dtype)
        logits = self.scorer(features)[:, 0].float()
        logits = logits.masked_fill(mask, float("-inf"))
        weights = torch.softmax(logits.flatten(1), dim=1).view_as(logits)
        return torch.nan_to_num(weights, nan=0.0)  # an image with no valid cell: all zero, not NaN

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm(F.relu(self.feature_proj(features)).permute(0, 2, 3, 1))  # [B, h, w, d]

    def pool(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(focus-weighted vector [B, d], focus [B, h, w])."""
        focus = self.focus_map(features, mask)
        return torch.einsum("bhw,bhwd->bd", focus.to(features.dtype), self.project(features)), focus

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        focus = self.focus_map(features, mask)
        cells = (~mask).flatten(1).sum(1).to(focus.dtype)[:, None, None]
        weight = 1 + self.gate * (cells * focus - 1)
        memory = self.project(features) * weight[..., None].to(features.dtype)
        return self.pos_enc(memory, mask), mask
