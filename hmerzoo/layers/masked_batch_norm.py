"""BatchNorm over the non-padded positions of a feature map (the official CoMER ``MaskBatchNorm2d``)."""
from __future__ import annotations

import torch
import torch.nn as nn


def batch_norm_valid(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Apply ``bn`` to the non-padded positions of x [M, C, h, w] only (pad [M, h, w], True = padding).

    In training the statistics (and the running averages) come from the valid positions alone, as the official
    ``MaskBatchNorm2d`` computes them; padded positions are returned unchanged. Works for BatchNorm1d/2d modules.
    """
    channels_last = x.permute(0, 2, 3, 1)  # [M, h, w, C]
    valid = ~pad
    picked = channels_last[valid]  # [n, C]
    if isinstance(bn, nn.BatchNorm2d):
        normed = bn(picked[:, :, None, None]).flatten(1)
    else:
        normed = bn(picked)
    out = channels_last.masked_scatter(valid[..., None], normed.to(x.dtype))
    return out.permute(0, 3, 1, 2)


class MaskedBatchNorm(nn.Module):
    """BatchNorm over the non-padded positions of a [M, C, h, w] map (the official ``MaskBatchNorm2d``).

    Holds a ``BatchNorm1d`` named ``bn`` so that official checkpoints (``post_norm.bn.*``) map by a rename.
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(num_features)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        return batch_norm_valid(self.bn, x, pad)
