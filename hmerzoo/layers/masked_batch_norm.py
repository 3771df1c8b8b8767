"""BatchNorm over the non-padded positions of a feature map (the official CoMER ``MaskBatchNorm2d``)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def batch_norm_valid(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Apply ``bn`` to the non-padded positions of x [M, C, h, w] only (pad [M, h, w], True = padding).

    In training the statistics (and the running averages) come from the valid positions alone, as the official
    ``MaskBatchNorm2d`` computes them; padded positions are returned unchanged. Works for BatchNorm1d/2d modules.
    The statistics are masked sums over the whole map, not an index of the valid positions: a boolean index costs
    a host sync (its size depends on the data) and breaks torch.compile graphs, on every call of CoMER's ARM.
    """
    valid = (~pad).unsqueeze(1)  # [M, 1, h, w]
    xf = x.float()
    if not bn.training and bn.track_running_stats and bn.running_mean is not None:
        # running statistics treat every position on its own: BatchNorm's own kernel over the whole map (the
        # official runs it on the gathered valid positions), padding put back after
        normed = F.batch_norm(xf, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return torch.where(valid, normed.to(x.dtype), x)
    weight = valid.to(xf.dtype)
    count = weight.sum()  # valid positions, the same for every channel
    mean = (xf * weight).sum((0, 2, 3)) / count.clamp_min(1)
    centred = (xf - mean[None, :, None, None]) * weight
    var = (centred * centred).sum((0, 2, 3)) / count.clamp_min(1)  # biased, as BatchNorm normalises with
    if bn.training and bn.track_running_stats and bn.running_mean is not None:
        _update_running_stats(bn, mean.detach(), var.detach(), count)
    normed = (xf - mean[None, :, None, None]) * torch.rsqrt(var + bn.eps)[None, :, None, None]
    if bn.affine:
        normed = normed * bn.weight.float()[None, :, None, None] + bn.bias.float()[None, :, None, None]
    return torch.where(valid, normed.to(x.dtype), x)


@torch.no_grad()
def _update_running_stats(bn: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor,
                          count: torch.Tensor) -> None:
    """BatchNorm's running averages, by hand: momentum (or a cumulative average when it is None), the variance
    unbiased over the valid positions. Tensor arithmetic only, so nothing waits for the device."""
    bn.num_batches_tracked.add_(1)
    unbiased = var * count / (count - 1).clamp_min(1)
    for running, batch in ((bn.running_mean, mean), (bn.running_var, unbiased)):
        if bn.momentum is None:  # cumulative average: the factor lives on the device, read by nobody
            running.lerp_(batch.to(running.dtype), 1.0 / bn.num_batches_tracked.to(running.dtype))
        else:
            running.mul_(1.0 - bn.momentum).add_(batch.to(running.dtype), alpha=bn.momentum)


class MaskedBatchNorm(nn.Module):
    """BatchNorm over the non-padded positions of a [M, C, h, w] map (the official ``MaskBatchNorm2d``).

    Holds a ``BatchNorm1d`` named ``bn`` so that official checkpoints (``post_norm.bn.*``) map by a rename.
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(num_features)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        return batch_norm_valid(self.bn, x, pad)
