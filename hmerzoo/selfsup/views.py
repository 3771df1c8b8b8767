"""Two augmented views of each image of a padded batch, made on the batch's device, with the geometric
correspondence kept: every view pixel knows the source-image point it shows.

One view is one resampling of the source (a single ``grid_sample``) through the map

    source(p) = o + (1/s) R(theta) Sh(k) (p - q) + d(p)

where p is a view pixel, q the centre of the view's valid area, o the centre of a crop window of the source that
contains the ink's bounding box (a crop that keeps the ink: only empty margins are trimmed), s a random scale,
R a small rotation, Sh a shear along x (slanted handwriting), and d a smooth random displacement field (elastic
distortion: coarse Gaussian noise upsampled bicubically). After sampling, strokes are thinned or thickened by one
grey-level erosion or dilation (stroke width). There is no flip: a mirrored expression is another expression.

Padding: the source's padded pixels are zeroed before sampling, so they can never reach a view; a view pixel is
padding when it lies outside the view's valid area or maps outside the source's valid area. Coordinates are
continuous pixel coordinates (pixel i covers [i, i+1)), (x, y) order.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

INK = 0.5  # a pixel is ink above this value (images are white ink on black in [0, 1])


@dataclasses.dataclass
class View:
    images: torch.Tensor  # [B, 1, H, W], padding zeroed
    mask: torch.Tensor  # [B, H, W] bool, True = padding
    coords: torch.Tensor  # [B, H, W, 2]: the source point (x, y) each view pixel shows


def valid_sizes(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Heights and widths of the valid (top-left) areas of a padded batch's mask [B, H, W]."""
    return (~mask[:, :, 0]).sum(1), (~mask[:, 0, :]).sum(1)


def ink_box(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, 4] (x0, y0, x1, y1) continuous bounds of each image's ink (its whole valid area when it has none)."""
    ink = (images[:, 0] > INK) & ~mask
    heights, widths = valid_sizes(mask)
    boxes = []
    for axis, size, extent in ((1, images.shape[-1], widths), (2, images.shape[-2], heights)):
        hit = ink.any(axis)  # [B, size] columns (axis 1 reduced: rows) or rows
        has = hit.any(1)
        first = hit.float().argmax(1)
        last = size - 1 - hit.flip(1).float().argmax(1)
        lo = torch.where(has, first, torch.zeros_like(first)).float()
        hi = torch.where(has, last + 1, extent).float()
        boxes.append((lo, hi))
    (x0, x1), (y0, y1) = boxes
    return torch.stack([x0, y0, x1, y1], 1)


def _uniform(n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, device=device)


class TwoViews(nn.Module):
    """Makes two views of a padded batch (``forward``) or one (``view``); no parameters.

    ``scale``: range of s (1 = source size); ``rotate``: max degrees; ``shear``: max x-shear factor;
    ``crop``: range of the fraction of the empty margin around the ink kept by the crop window (1: no crop);
    ``elastic``: displacement amplitude in pixels (0: off), ``elastic_spacing``: pixels between the noise points;
    ``stroke``: probability of an erosion and (separately) of a dilation by one pixel (0: off).
    ``identity=True`` makes views equal to the source (tests, and the unaugmented view of stage 2).
    """

    def __init__(self, scale: Sequence[float] = (0.8, 1.15), rotate: float = 5.0, shear: float = 0.15,
                 crop: Sequence[float] = (0.3, 1.0), elastic: float = 1.5, elastic_spacing: float = 12.0,
                 stroke: float = 0.25, identity: bool = False):
        super().__init__()
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f"views.scale: expected [low, high] with 0 < low <= high, got {scale}")
        if len(crop) != 2 or not 0 <= crop[0] <= crop[1] <= 1:
            raise ValueError(f"views.crop: expected [low, high] within [0, 1], got {crop}")
        if not 0 <= stroke <= 0.5:
            raise ValueError(f"views.stroke: a probability in [0, 0.5], got {stroke}")
        self.scale, self.rotate, self.shear, self.crop = tuple(scale), float(rotate), float(shear), tuple(crop)
        self.elastic, self.elastic_spacing, self.stroke = float(elastic), float(elastic_spacing), float(stroke)
        self.identity = identity

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[View, View]:
        return self.view(images, mask), self.view(images, mask)

    def view(self, images: torch.Tensor, mask: torch.Tensor) -> View:
        b, _, height, width = images.shape
        device = images.device
        source = images * (~mask)[:, None].to(images.dtype)
        ys = torch.arange(height, device=device, dtype=torch.float32) + 0.5
        xs = torch.arange(width, device=device, dtype=torch.float32) + 0.5
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points = torch.stack([grid_x, grid_y], -1).expand(b, height, width, 2)  # view pixel centres
        if self.identity:
            return View(source, mask.clone(), points.clone())
        src_h, src_w = valid_sizes(mask)
        box = ink_box(source, mask)
        # crop window: the ink box plus a random share of the margins on each axis, placed at random around it
        windows = []
        for lo, hi, extent in ((box[:, 0], box[:, 2], src_w.float()), (box[:, 1], box[:, 3], src_h.float())):
            size = (hi - lo) + _uniform(b, *self.crop, device) * (extent - (hi - lo))
            start_min, start_max = (hi - size).clamp(min=0), torch.minimum(lo, extent - size)
            start = start_min + torch.rand(b, device=device) * (start_max - start_min).clamp(min=0)
            windows.append((start + size / 2, size))
        (ox, wx), (oy, wy) = windows
        s = _uniform(b, *self.scale, device)
        s = torch.minimum(s, torch.minimum(height / wy, width / wx))  # the view must fit the canvas
        out_w, out_h = (wx * s).clamp(min=1).floor(), (wy * s).clamp(min=1).floor()
        theta = _uniform(b, -self.rotate, self.rotate, device) * math.pi / 180
        k = _uniform(b, -self.shear, self.shear, device)
        cos, sin = torch.cos(theta), torch.sin(theta)
        # M = (1/s) R Sh, Sh = [[1, k], [0, 1]]
        m = torch.stack([torch.stack([cos, cos * k - sin], -1), torch.stack([sin, sin * k + cos], -1)], -2)
        m = m / s[:, None, None]
        q = torch.stack([out_w / 2, out_h / 2], -1)
        o = torch.stack([ox, oy], -1)
        coords = o[:, None, None] + torch.einsum("bij,bhwj->bhwi", m, points - q[:, None, None])
        if self.elastic > 0:
            coarse = (math.ceil(height / self.elastic_spacing) + 1, math.ceil(width / self.elastic_spacing) + 1)
            noise = torch.randn(b, 2, *coarse, device=device) * self.elastic
            field = F.interpolate(noise, size=(height, width), mode="bicubic", align_corners=True)
            coords = coords + field.permute(0, 2, 3, 1)
        inside_view = (points[..., 0] < out_w[:, None, None]) & (points[..., 1] < out_h[:, None, None])
        inside_source = ((coords[..., 0] >= 0) & (coords[..., 0] < src_w[:, None, None])
                         & (coords[..., 1] >= 0) & (coords[..., 1] < src_h[:, None, None]))
        view_mask = ~(inside_view & inside_source)
        norm = torch.stack([coords[..., 0] / width, coords[..., 1] / height], -1) * 2 - 1
        out = F.grid_sample(source, norm.to(source.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
        if self.stroke > 0:
            out = self.stroke_width(out)
        out = out * (~view_mask)[:, None].to(out.dtype)
        return View(out, view_mask, coords)

    def stroke_width(self, images: torch.Tensor) -> torch.Tensor:
        """Per image: erosion (thinner strokes) with probability ``stroke``, dilation with ``stroke``, else as is."""
        draw = torch.rand(images.shape[0], device=images.device)[:, None, None, None]
        dilated = F.max_pool2d(images, 3, stride=1, padding=1)
        eroded = -F.max_pool2d(-images, 3, stride=1, padding=1)
        return torch.where(draw < self.stroke, eroded, torch.where(draw < 2 * self.stroke, dilated, images))


def feature_points(coords: torch.Tensor, mask: torch.Tensor, feature_shape: tuple[int, int],
                   stride: int) -> torch.Tensor:
    """The source points of a feature map's cells: the view pixel at each cell's receptive centre (stride s: pixel
    s*i + s/2 - 1, clamped to the canvas). [B, H, W, 2] -> [B, h, w, 2]."""
    h, w = feature_shape
    height, width = coords.shape[1:3]
    if h != math.ceil(height / stride) or w != math.ceil(width / stride):
        raise ValueError(f"feature_stride={stride}: a {height}x{width} image gave a {h}x{w} feature map, not "
                         f"{math.ceil(height / stride)}x{math.ceil(width / stride)}; set model.feature_stride to the "
                         "encoder's downsampling")
    rows = (torch.arange(h, device=coords.device) * stride + stride // 2 - 1).clamp(max=height - 1)
    cols = (torch.arange(w, device=coords.device) * stride + stride // 2 - 1).clamp(max=width - 1)
    return coords[:, rows][:, :, cols]


def ink_cells(images: torch.Tensor, stride: int) -> torch.Tensor:
    """[B, h, w] bool: the stride x stride cells of the images that hold ink."""
    return F.max_pool2d(images, stride, stride=stride, ceil_mode=True)[:, 0] > INK
