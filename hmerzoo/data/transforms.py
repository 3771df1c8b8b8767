"""CoMER's image transforms (``comer/datamodule/transforms.py``), on [1, h, w] float tensors.

CoMER resizes uint8 numpy arrays with ``cv2.resize(img, None, fx=k, fy=k, interpolation=INTER_LINEAR)``. Two facts
of that call are kept here:

* the output size is ``round(w * k) x round(h * k)`` (cv2 rounds; ``F.interpolate(scale_factor=k)`` floors), and
  the source coordinate of output pixel ``x`` is ``(x + 0.5) / k - 0.5`` (half-pixel centres, no antialiasing), so
  we call aten's bilinear kernel with both the size and the scale;
* the result is 8-bit, so by default it is rounded back to multiples of 1/255.

Randomness comes only from the ``torch.Generator`` passed in, so a caller that seeds it from (seed, epoch, bucket)
gets the same images whatever the number of DataLoader workers.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..registry import TRANSFORMS


def resize_like_cv2(image: torch.Tensor, scale_h: float, scale_w: float, quantize: bool = True,
                    size: tuple[int, int] | None = None) -> torch.Tensor:
    """Bilinear resize of [C, h, w] (or [B, C, h, w]) by (scale_h, scale_w), as cv2 INTER_LINEAR with fx/fy.

    ``size`` (h, w) overrides the rounded output size while the coordinate mapping keeps using the scales.
    """
    batched = image.dim() == 4
    x = image if batched else image.unsqueeze(0)
    in_h, in_w = int(x.shape[-2]), int(x.shape[-1])
    if size is None:
        # cv2 computes dsize with cvRound (round half to even), like Python's round
        size = (max(1, round(in_h * scale_h)), max(1, round(in_w * scale_w)))
    out_h, out_w = size
    if (out_h, out_w) == (in_h, in_w) and scale_h == 1.0 and scale_w == 1.0:
        return image
    dtype = x.dtype
    x = x.float()
    out = torch.ops.aten.upsample_bilinear2d.default(x, [out_h, out_w], False, float(scale_h), float(scale_w))
    if quantize:
        out = torch.round(out.clamp(0.0, 1.0) * 255.0) / 255.0
    out = out.to(dtype)
    return out if batched else out.squeeze(0)


@TRANSFORMS.register("scale_to_limit")
class ScaleToLimitRange:
    """Scale an image uniformly so that h is in [h_lo, h_hi] and w in [w_lo, w_hi] (CoMER's ScaleToLimitRange).

    Too big on either side: scale down by min(h_hi/h, w_hi/w). Otherwise too small on either side: scale up by
    max(h_lo/h, w_lo/w). Otherwise unchanged. CoMER asserts that h/w lies in [h_lo/w_hi, h_hi/w_lo]; here an image
    outside that range (a long thin line, a tall sliver) is scaled the same way and the side that is still out of
    range is then clamped to its limit (a non-uniform resize), so odd user images still go through.
    """

    def __init__(self, w_lo: int = 16, w_hi: int = 1024, h_lo: int = 16, h_hi: int = 256, quantize: bool = True):
        if not (0 < w_lo <= w_hi and 0 < h_lo <= h_hi):
            raise ValueError(f"ScaleToLimitRange: need 0 < w_lo <= w_hi and 0 < h_lo <= h_hi, got "
                             f"w [{w_lo}, {w_hi}], h [{h_lo}, {h_hi}]")
        self.w_lo, self.w_hi, self.h_lo, self.h_hi = w_lo, w_hi, h_lo, h_hi
        self.quantize = quantize

    def output_size(self, h: int, w: int) -> tuple[int, int, float]:
        """(new_h, new_w, uniform scale) for an h x w image; the scale is 1.0 when nothing changes."""
        scale = min(self.h_hi / h, self.w_hi / w)
        if scale >= 1.0:
            scale = max(self.h_lo / h, self.w_lo / w)
            if scale <= 1.0:
                scale = 1.0
        new_h = min(max(round(h * scale), self.h_lo), self.h_hi)
        new_w = min(max(round(w * scale), self.w_lo), self.w_hi)
        return new_h, new_w, scale

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        h, w = int(image.shape[-2]), int(image.shape[-1])
        new_h, new_w, scale = self.output_size(h, w)
        if scale == 1.0 and (new_h, new_w) == (h, w):
            return image
        uniform_h, uniform_w = max(1, round(h * scale)), max(1, round(w * scale))
        # in-range aspect ratio: exactly CoMER's uniform cv2 resize; otherwise the clamped side gets its own scale
        scale_h = scale if new_h == uniform_h else new_h / h
        scale_w = scale if new_w == uniform_w else new_w / w
        return resize_like_cv2(image, scale_h, scale_w, quantize=self.quantize, size=(new_h, new_w))

    def __repr__(self) -> str:
        return f"ScaleToLimitRange(w=[{self.w_lo}, {self.w_hi}], h=[{self.h_lo}, {self.h_hi}])"


@TRANSFORMS.register("scale_aug")
class ScaleAugmentation:
    """Resize by k ~ U(lo, hi), the same k for both sides (CoMER's ScaleAugmentation, training only)."""

    def __init__(self, lo: float = 0.7, hi: float = 1.4, quantize: bool = True):
        if not 0 < lo <= hi:
            raise ValueError(f"ScaleAugmentation: need 0 < lo <= hi, got lo={lo}, hi={hi}")
        self.lo, self.hi = lo, hi
        self.quantize = quantize

    def sample_scale(self, generator: torch.Generator | None = None) -> float:
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        return self.lo + (self.hi - self.lo) * u

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        k = self.sample_scale(generator)
        return resize_like_cv2(image, k, k, quantize=self.quantize)

    def __repr__(self) -> str:
        return f"ScaleAugmentation(lo={self.lo}, hi={self.hi})"


class Compose:
    """Apply transforms in order, passing the same generator to each."""

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for transform in self.transforms:
            image = transform(image, generator)
        return image

    def __len__(self) -> int:
        return len(self.transforms)

    def __repr__(self) -> str:
        return f"Compose({', '.join(repr(t) for t in self.transforms)})"
