"""Sinusoidal position encodings of the BTTR family.

- :func:`image_position_encoding` / :class:`ImagePositionEncoding`: DETR-style 2-D encodings of a feature map.
  Positions are cumulative sums over the *non-padded* pixels, normalised by each row's/column's valid extent
  (``/ (last + 1e-6) * 2π``), so padding does not shift the encoding of the valid area. Half of the channels
  encode x, the other half y (x first). Two variants exist and are not interchangeable:

  * ``"bttr"`` (BTTR ``ImgPosEnc``): frequency index ``k = 0 .. d/2-1``; channel ``k`` is ``sin`` for even ``k``
    and ``cos`` for odd ``k`` (each channel has its own frequency).
  * ``"comer"`` (CoMER and descendants): frequencies ``k = 0, 2, 4 .. < d/2``; each frequency gives a
    ``sin, cos`` pair of adjacent channels.

- :class:`WordPosEnc`: the 1-D encoding of decoder positions (``sin`` on even, ``cos`` on odd channels, frequency
  of pair ``i`` = ``1 / T^(2i/d)``), kept as the buffer ``pe`` [max_len, d] as in the official checkpoints.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

IMAGE_POSENC_VARIANTS = ("bttr", "comer")


def _normalised_positions(mask: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) positions [B,h,w] of the non-padded pixels, each running to ``scale`` at the valid extent's end."""
    not_mask = ~mask.bool()
    y_embed = not_mask.cumsum(1, dtype=torch.float32)
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    eps = 1e-6
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    return x_embed, y_embed


def image_position_encoding(mask: torch.Tensor, d_model: int, variant: str = "bttr", temperature: float = 10000.0,
                            scale: float = 2 * math.pi) -> torch.Tensor:
    """The 2-D encoding [B,h,w,d_model] (float32) of a feature map whose padding mask is ``mask`` [B,h,w]."""
    if variant not in IMAGE_POSENC_VARIANTS:
        raise ValueError(f"image position encoding: unknown variant {variant!r}; choose one of {IMAGE_POSENC_VARIANTS}")
    if d_model % 4 != 0:
        raise ValueError(f"image position encoding: d_model must be a multiple of 4, got {d_model}")
    half = d_model // 2
    x_embed, y_embed = _normalised_positions(mask, scale)
    if variant == "bttr":
        freq_index = torch.arange(half, dtype=torch.float32, device=mask.device)
    else:
        freq_index = torch.arange(0, half, 2, dtype=torch.float32, device=mask.device)
    inv_freq = 1.0 / (temperature ** (freq_index / half))
    parts = []
    for embed in (x_embed, y_embed):
        angles = embed[..., None] * inv_freq  # [B,h,w,F]
        if variant == "bttr":
            # channel k: sin for even k, cos for odd k, each at its own frequency k
            enc = torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1)
        else:
            # one frequency per sin/cos pair
            enc = torch.stack((angles.sin(), angles.cos()), dim=-1)
        parts.append(enc.flatten(-2))
    return torch.cat(parts, dim=-1)


class ImagePositionEncoding(nn.Module):
    """Adds the 2-D encoding to channels-last features: (x [B,h,w,d], mask [B,h,w]) -> x + PE. No parameters."""

    def __init__(self, d_model: int, variant: str = "bttr", temperature: float = 10000.0, scale: float = 2 * math.pi):
        super().__init__()
        if variant not in IMAGE_POSENC_VARIANTS:
            raise ValueError(f"image position encoding: unknown variant {variant!r}; choose one of "
                             f"{IMAGE_POSENC_VARIANTS}")
        self.d_model = d_model
        self.variant = variant
        self.temperature = temperature
        self.scale = scale

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pos = image_position_encoding(mask, self.d_model, self.variant, self.temperature, self.scale)
        return x + pos.to(x.dtype)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, variant={self.variant!r}"


def word_position_table(max_len: int, d_model: int, temperature: float = 10000.0) -> torch.Tensor:
    """[max_len, d_model]: row t is the encoding of position t (sin on even, cos on odd channels)."""
    position = torch.arange(max_len, dtype=torch.float32)
    inv_freq = 1.0 / (temperature ** (torch.arange(0, d_model, 2, dtype=torch.float32) / d_model))
    angles = position[:, None] * inv_freq[None, :]
    table = torch.zeros(max_len, d_model)
    table[:, 0::2] = angles.sin()
    table[:, 1::2] = angles.cos()
    return table


class WordPosEnc(nn.Module):
    """Adds the 1-D encoding of positions ``offset .. offset+L-1`` to x [N, L, d].

    ``pe`` is a persistent buffer because the official checkpoints store it (``decoder.pos_enc.pe``).
    """

    def __init__(self, d_model: int = 256, max_len: int = 500, temperature: float = 10000.0):
        super().__init__()
        self.d_model = d_model
        self.max_len = max_len
        self.register_buffer("pe", word_position_table(max_len, d_model, temperature))

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        length = x.shape[1]
        if offset + length > self.max_len:
            raise ValueError(f"word position encoding: position {offset + length - 1} is beyond max_len "
                             f"{self.max_len}; sequences this long cannot be decoded by this model")
        return x + self.pe[offset:offset + length].to(x.dtype)[None]

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, max_len={self.max_len}"
