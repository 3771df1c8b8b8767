"""Stage 2's progressive spatial masking: the ratio schedule and the block masks.

Blocks are drawn on the encoder's feature grid and hidden in the image (each hidden cell blanks its stride x stride
pixels): hiding pixels, not feature cells, means the encoder really does not see the occluded ink (a feature cell's
receptive field spans much of the image, so zeroing cells of the feature map would leave the content readable from
the neighbours), while drawing on the grid keeps the hidden area aligned with whole cells.
"""
from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine", "step")


class MaskSchedule:
    """Fraction of an image's valid cells hidden after ``step`` optimizer steps: from ``start`` to ``end`` over
    ``steps`` steps, then ``end``. ``linear``; ``cosine`` (slow, fast, slow); ``step``: ``stages`` equal plateaus
    start, ..., the last one at ``end`` (e.g. 4 stages: start, +1/3, +2/3, end)."""

    def __init__(self, start: float = 0.1, end: float = 0.5, schedule: str = "linear", steps: int = 10000,
                 stages: int = 4):
        if not 0 <= start <= 1 or not 0 <= end <= 1:
            raise ValueError(f"mask.start and mask.end must be in [0, 1], got {start}, {end}")
        if schedule not in SCHEDULES:
            raise ValueError(f"mask.schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if steps < 1 or stages < 2:
            raise ValueError(f"mask.steps must be >= 1 and mask.stages >= 2, got {steps}, {stages}")
        self.start, self.end, self.schedule, self.steps, self.stages = start, end, schedule, steps, stages

    def __call__(self, step: int) -> float:
        t = min(max(step, 0) / self.steps, 1.0)
        if self.schedule == "linear":
            f = t
        elif self.schedule == "cosine":
            f = (1 - math.cos(math.pi * t)) / 2
        else:
            f = min(math.floor(t * self.stages), self.stages - 1) / (self.stages - 1)
        return self.start + (self.end - self.start) * f


def block_mask(valid: torch.Tensor, ratio: float, block: int) -> torch.Tensor:
    """[B, h, w] bool of hidden cells: round(ratio * n_valid) valid cells of each image, chosen as whole
    block x block squares in random order (the last square may be partly hidden). Padding is never hidden."""
    b, h, w = valid.shape
    coarse = torch.rand(b, math.ceil(h / block), math.ceil(w / block), device=valid.device)
    scores = coarse.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :h, :w]
    # ties inside a block are broken at random so that a partly hidden block still hides exactly k cells
    scores = scores + torch.rand(b, h, w, device=valid.device) * 1e-4
    scores = scores.masked_fill(~valid, 2.0).flatten(1)
    k = torch.round(ratio * valid.flatten(1).sum(1).float()).long()
    order = scores.argsort(1)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w, device=valid.device).expand(b, -1))
    return (rank < k[:, None]).view(b, h, w) & valid


def hide_pixels(images: torch.Tensor, hidden: torch.Tensor, stride: int) -> torch.Tensor:
    """Blank the stride x stride pixels of each hidden cell ([B,1,H,W] images, [B,h,w] hidden)."""
    height, width = images.shape[-2:]
    pixels = hidden.repeat_interleave(stride, 1).repeat_interleave(stride, 2)[:, :height, :width]
    return images * (~pixels)[:, None].to(images.dtype)
