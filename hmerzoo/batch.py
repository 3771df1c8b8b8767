"""The batch every model, head and loss receives."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    """A padded batch of images with their token ids.

    images: [B, 1, H, W] float32 in [0, 1], white ink on black, zero-padded bottom/right.
    image_mask: [B, H, W] bool, True = padding (the BTTR/CoMER convention).
    tokens: per sample, the caption's token ids without start/end tokens.
    names: per sample, the image name (for error messages and prediction files).
    """

    images: torch.Tensor
    image_mask: torch.Tensor
    tokens: list[list[int]]
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(self.images.to(device, non_blocking=non_blocking),
                     self.image_mask.to(device, non_blocking=non_blocking), self.tokens, self.names)

    def pin_memory(self) -> "Batch":
        return Batch(self.images.pin_memory(), self.image_mask.pin_memory(), self.tokens, self.names)


def pad_images(images: list[torch.Tensor], multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """List of [1, h, w] tensors -> ([B, 1, H, W] zero-padded bottom/right, [B, H, W] bool mask True = padding).

    ``multiple``: H and W rounded up to a multiple of it (data.pad_multiple), so that batches fall into fewer
    distinct shapes (fewer cuDNN algorithm searches and compiled graphs, less allocator fragmentation on a GPU)."""
    h = _round_up(max(int(im.shape[-2]) for im in images), multiple)
    w = _round_up(max(int(im.shape[-1]) for im in images), multiple)
    out = images[0].new_zeros(len(images), 1, h, w)
    mask = torch.ones(len(images), h, w, dtype=torch.bool)
    for i, im in enumerate(images):
        ih, iw = im.shape[-2:]
        out[i, :, :ih, :iw] = im
        mask[i, :ih, :iw] = False
    return out, mask


def _round_up(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple if multiple > 1 else size
